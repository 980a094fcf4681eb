"""`python -m featx`."""

from featx.cli.main import main

main()
