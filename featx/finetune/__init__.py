"""``featx finetune``: LP-FT fine-tuning of a backbone card, exported back to ONNX.

The recipe (Kumar et al. 2022, "LP-FT"): fit a logistic-regression head on
cached embeddings of the frozen backbone, fold its scaler into a new linear
layer, then train that layer together with the top ``unfreeze`` blocks of the
card. The network is ``make_wrapper(backbone)`` + linear, i.e. the very
module that is exported, so training, evaluation and the exported ONNX graph
share the card's preprocessing (uint8 pixels in, normalisation inside).

A run directory holds everything::

    config.json   split.json   last.pt (resumable)   best.pt
    metrics.csv   metrics.json   curve.png   lp_head.json
    backbone/     model.onnx + model.json: a backbone like any other (new fingerprint)
    head.featx    the fine-tuned linear layer as a featx head for `featx predict`
    classifier.onnx + classifier.json: uint8 pixels -> class probabilities, one file
    summary.json  status.json
"""

from featx.finetune.config import FinetuneConfig, card_for, check_blocks, default_run_dir
from featx.finetune.export import export_network_classifier, linear_as_logreg, predict_files
from featx.finetune.lp import InitialNetwork, base_backbone, fold_head, init_network
from featx.finetune.run import (
           FinetuneInterrupted,
           FinetuneResult,
           RunSummary,
           arrays_as_files,
           finetune,
)

__all__ = ["FinetuneConfig", "FinetuneInterrupted", "FinetuneResult", "InitialNetwork", "RunSummary",
           "arrays_as_files",
           "base_backbone", "card_for", "check_blocks", "default_run_dir", "export_network_classifier",
           "finetune", "fold_head", "init_network", "linear_as_logreg", "predict_files"]
