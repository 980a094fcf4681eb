"""`python -m featx`."""

from featx.cli import main

main()
