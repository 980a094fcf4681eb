"""``--device auto|cpu|cuda``: the one check, for ONNX Runtime, torch and Ray alike.

Loud device choice: ``auto`` takes CUDA when the backend has it; an explicit
``cuda`` that cannot be honoured is an error, never a silent CPU fallback.
"""

from __future__ import annotations

from featx.errors import DeviceError, FeatXError

__all__ = ["DEVICES", "check_device_name", "choose_device"]

DEVICES = ("auto", "cpu", "cuda")


def check_device_name(device: str) -> str:
    """Return ``device`` if it is one of auto, cpu, cuda; raise a FeatXError naming it otherwise."""
    if device not in DEVICES:
        raise FeatXError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    return device


def choose_device(device: str, has_cuda: bool, why_not: str) -> str:
    """``"cuda"`` or ``"cpu"`` for the asked ``device`` given whether the backend has CUDA.

    ``why_not`` completes the error raised for an explicit cuda without CUDA: what the
    backend saw and what to do ("ONNX Runtime has no CUDA provider here ...").
    """
    check_device_name(device)
    if device == "cuda" and not has_cuda:
        raise DeviceError(f"--device cuda asked for, but {why_not}")
    return "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"
