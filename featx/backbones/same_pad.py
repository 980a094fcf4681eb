"""Fixed TF "SAME" padding for export: timm's Conv2dSame made static for one input size.

timm's TF-ported models (the efficientnet_lite cards) pad each strided conv
from the input's shape at run time. Traced to ONNX that is a chain of
Shape/Ceil/Clip/Pad ops per conv: about 8% of fp32 inference time, and int8
quantisation then wrongly quantises that shape arithmetic and leaves the pads
as float islands between int8 convs. An export has one input size, so the
padding is a constant: a symmetric one goes into the conv itself, an
asymmetric one becomes a constant Pad that ONNX Runtime fuses into the conv.
"""

from __future__ import annotations

import copy
import math

from featx.errors import require


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding of TF SAME for one spatial dimension (timm's pad_same)."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def freeze_same_padding(module, input_size: int):
    """A copy of ``module`` (uint8 NHWC in) with every timm Conv2dSame made static for ``input_size``.

    Returns ``module`` itself when it has no Conv2dSame (torchvision models).
    The copy computes the same function at that input size; parity checks in
    the export confirm it.
    """
    torch = require("torch", "torch")
    try:
        from timm.layers.conv2d_same import Conv2dSame
    except ImportError:  # no timm, so no timm modules to fix
        return module
    if not any(isinstance(m, Conv2dSame) for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    shapes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: shapes.__setitem__(name, args[0].shape[-2:]))
             for name, m in module.named_modules() if isinstance(m, Conv2dSame)]
    try:
        with torch.no_grad():
            module(torch.zeros(1, input_size, input_size, 3, dtype=torch.uint8))
    finally:
        for h in hooks:
            h.remove()
    for name, (h, w) in shapes.items():
        conv = module.get_submodule(name)
        (top, bottom), (left, right) = (
            _same_pads(n, k, s, d) for n, k, s, d in zip((h, w), conv.kernel_size, conv.stride, conv.dilation,
                                                          strict=True))
        fixed = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                padding=0, dilation=conv.dilation, groups=conv.groups,
                                bias=conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
        fixed.load_state_dict(conv.state_dict())
        if (top, left) == (bottom, right):
            fixed.padding = (top, left)
            replacement = fixed
        else:
            replacement = torch.nn.Sequential(torch.nn.ZeroPad2d((left, right, top, bottom)), fixed)
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, replacement)
    return module.eval()
