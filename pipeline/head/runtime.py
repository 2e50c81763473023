"""Where and how the head runs: the device, the seed, the precision.

Training, evaluation, rendering and prediction all need the same three choices, so they live here rather
than beside any one of them. On CUDA the head runs under bf16 autocast (no loss scaling needed); on the
CPU it runs in float32, which is both exact and, on CPUs without bf16 units, the fastest. torch is
imported inside each function so that importing this module (and the CLI's --help) stays cheap.
"""
from __future__ import annotations

import contextlib

from pipeline.config import DEVICES, ConfigError


def pick_device(name: str) -> "torch.device":  # noqa: F821
    """`auto` is CUDA when torch sees it, else the CPU; asking for CUDA without it is a config error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got '{name}'")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Same seed, same run: torch's generators seeded, deterministic kernels asked for."""
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def autocast(device: "torch.device"):  # noqa: F821
    """bf16 autocast on CUDA, nothing on the CPU (see the module's docstring for why)."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
