"""``python -m featx.cli``."""

from featx.cli.main import main

main()
