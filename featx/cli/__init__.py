"""featx's command line: one click group (``main``), one module per family of commands.

``main`` is the group (errors as one line, Ctrl-C as exit 130); ``options`` holds what
commands share (options, the ``auto|FLOAT`` type, the progress bar, the summary
printer). ``extract`` (models, export, extract), ``heads`` (fit-head, predict,
evaluate, export-classifier), ``finetune`` (finetune, compare), ``cache`` (cache info |
prune | verify), ``similarity`` (neighbors, duplicates) and ``plot`` (plot) each parse
options, call one library function and render its result.
"""

from featx.cli.main import main

__all__ = ["main"]
