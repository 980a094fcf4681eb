"""featx's command line: one click group (``main``), one module per family of commands.

``options`` holds what commands share; ``extract`` (models, export, extract), ``heads``
(fit-head, predict, evaluate, export-classifier) and ``finetune`` (finetune, compare)
each parse options, call one library function and render its result.
"""

from featx.cli.main import main

__all__ = ["main"]
