"""LP init (the "LP" of LP-FT): a logistic-regression head on frozen embeddings, folded into a linear layer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from featx.backbones.cards import BackboneCard, get_card
from featx.errors import FeatXError, require
from featx.finetune.config import FinetuneConfig, card_for
from featx.finetune.data import LabelledFiles
from featx.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)


def base_backbone(card: BackboneCard, module, weights_sha: str, weights: str | None, recipe=None):
    """The frozen starting backbone as an export (cached), for the LP head's embeddings.

    ``recipe`` (a ``multi`` FeatureRecipe) when ``module`` computes the multi embedding.
    """
    from featx.backbones.artifact import cached_sidecar, load_export
    from featx.backbones.export import export_dir_for, write_export
    from featx.backbones.resolve import resolve_backbone

    features = "last" if recipe is None else recipe.name
    stock = get_card(card.name)
    if card.preprocess == stock.preprocess:
        return resolve_backbone(card.name, weights=weights, features=features)
    dest = export_dir_for(card, weights_sha)
    if recipe is not None:
        dest = dest.with_name(f"{dest.name}-{features}")
    side = cached_sidecar(dest)  # a damaged or half-written export is made again
    if side is not None and side.card_digest == card.digest() and side.feature_recipe == features:
        return load_export(dest)
    torch = require("torch", "torch")
    suffix = "" if recipe is None else f"-{features}"
    meta = {"name": f"{card.name}{suffix}@{card.preprocess.input_size}px", "card": card.to_dict(),
            "card_digest": card.digest(), "weights": weights or card.weights,
            "weights_sha256": weights_sha, "dim": card.dim if recipe is None else recipe.dim,
            "torch_version": torch.__version__}
    if recipe is not None:
        meta["features"] = recipe.to_dict()
    return load_export(write_export(module.eval(), card.preprocess, dest, meta))


def fit_lp_head(X: np.ndarray, y_names: list[str], classes: list[str], C: float | str,
                class_weight: str | None, seed: int):
    """The logistic-regression probe: featx.heads.fit.fit_head, with C by CV when there is enough data."""
    from featx.heads.fit import fit_head

    if C == "auto" and min(np.unique(y_names, return_counts=True)[1]) < 2:
        log.info("too few images per class to choose C by cross-validation; LP head uses C=1")
        C = 1.0
    pipe, report = fit_head(X, y_names, head="logreg", C=C, class_weight=class_weight, seed=seed)
    if report["classes"] != list(classes):
        missing = sorted(set(classes) - set(report["classes"]))
        raise FeatXError(f"no readable training image for classes {missing}; LP init needs every "
                         "class (fix the images, or pass --no-lp-init)")
    return pipe, report


def fold_head(pipe, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of a linear layer computing the head's logits from raw embeddings.

    The scaler is folded in: W' = W / scale, b' = b - W' @ mean. A binary
    logistic regression has one logit z; softmax([-z/2, z/2]) = sigmoid(z).
    """
    scaler, clf = pipe.named_steps["scaler"], pipe.named_steps["clf"]
    W = np.asarray(clf.coef_, dtype=np.float64)
    b = np.asarray(clf.intercept_, dtype=np.float64)
    if W.shape[0] == 1 and n_classes == 2:
        W = np.vstack([-W / 2, W / 2])
        b = np.array([-b[0] / 2, b[0] / 2])
    scale = np.asarray(scaler.scale_ if scaler.scale_ is not None else np.ones(W.shape[1]))
    mean = np.asarray(scaler.mean_ if scaler.mean_ is not None else np.zeros(W.shape[1]))
    W = W / scale[None, :]
    b = b - W @ mean
    return W.astype(np.float32), b.astype(np.float32)


def lp_init(net, card: BackboneCard, module_for_export, weights_sha: str, cfg: FinetuneConfig,
            train: LabelledFiles, store, device: str, progress: ProgressFn) -> tuple[dict, object]:
    """Fit the LP head on cached embeddings of the training images and load it into ``net.head``."""
    import torch

    from featx.engines.files import FileEmbedder

    progress("backbone", 0, 0)
    bb = base_backbone(card, module_for_export, weights_sha, cfg.weights, getattr(net, "recipe", None))
    done = FileEmbedder.open(bb, "cpu" if device == "cpu" else "auto", store).files(train.paths, progress=progress)
    stats, ok = done.stats, done.ok
    X = done.rows()
    names = [train.classes[train.labels[i]] for i in ok]
    progress("lp-init", 0, 1)
    pipe, report = fit_lp_head(X, names, train.classes, cfg.lp_C,
                               "balanced" if cfg.class_weight else None, cfg.seed)
    W, b = fold_head(pipe, len(train.classes))
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(W))
        net.head.bias.copy_(torch.from_numpy(b))
    progress("lp-init", 1, 1)
    report = {k: v for k, v in report.items() if k != "cv_grid"} | {
        "embedding_backbone": bb.name, "embedding_fingerprint": bb.fingerprint,
        "embedding_backbone_dir": str(bb.onnx_path.parent),
        "embedded": stats.embedded, "cached": stats.cached, "failed": len(stats.failures)}
    return report, pipe



@dataclass
class InitialNetwork:
    """The network before any training step (LP head loaded when asked)."""

    net: object
    card: BackboneCard
    weights_sha: str
    lp_report: dict | None = None
    lp_pipeline: object | None = None


def init_network(cfg: FinetuneConfig, train: LabelledFiles, *, store=None, device: str = "auto",
                 lp: bool | None = None, progress: ProgressFn = no_progress) -> InitialNetwork:
    """Build the card's model (pretrained unless ``cfg.pretrained`` is off) plus a new linear layer.

    With ``lp`` (default ``cfg.lp_init``) the layer starts as the logistic
    regression fitted on cached embeddings of ``train``, scaler folded in.
    """
    from featx.backbones.export import make_wrapper
    from featx.backbones.zoo import build
    from featx.finetune import loop as tl

    card = card_for(cfg)
    progress("model", 0, 0)
    backbone, _, wsha = build(card, cfg.weights, pretrained=cfg.pretrained)
    recipe = None
    if cfg.features == "multi":  # the layer reads pooled stages too: LP-FT from the multi-layer probe
        from featx.backbones.features import multi_features

        backbone, recipe = multi_features(backbone, card)
    features = make_wrapper(backbone, card.preprocess)
    net = tl.FineTuneNet(features, card.dim if recipe is None else recipe.dim, len(train.classes))
    net.recipe = recipe  # what the export records (None: the card's own embedding)
    init = InitialNetwork(net, card, wsha)
    if cfg.lp_init if lp is None else lp:
        init.lp_report, init.lp_pipeline = lp_init(net, card, features, wsha, cfg, train, store,
                                                   device, progress)
    return init

