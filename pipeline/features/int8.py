"""The int8 trunk (`extract.precision: int8`): the fp32 trunk quantised by torchao's PT2E flow with the X86
inductor quantizer, then compiled by inductor with frozen weights, so oneDNN runs int8 convolutions on the
CPU's int8 instructions (AVX-512 VNNI, AMX-INT8).

Why this scheme: weights int8 per output channel (symmetric), activations uint8 per tensor with static ranges
calibrated on frames of the dataset being extracted (torchao's default X86 configuration, histogram
observers). Measured on a 2-core AMD EPYC with AVX-512 VNNI/BF16 (docs/BENCHMARKS.md, "int8 trunk"): about
2x the bf16 trunk, 4-5x fp32, at a pool5 error of ~7% against fp32 (bf16: 1%).

What a cache records is the *calibration*, not the frames: the activation ranges the observers chose
(scale and zero point of every activation quantizer, in graph order) and which clips and frames chose
them. Rebuilding from that record (a rerun, predict, watch, a Ray actor) gives the same quantised trunk
without the dataset, so the same record always gives the same int8 weights and the same bytes.

torchao is an optional extra (`pip install 'videoattn-pipeline[int8]'`); it, like torch.export and inductor,
is imported only here and only when int8 is asked for.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch
from torch import Tensor, nn

SCHEME = "torchao-pt2e-x86-inductor: int8 per-channel weights, uint8 per-tensor static activations (histogram)"
NONE = "none"  # the quantization setting of an fp32 or bf16 cache


class QuantizeError(ValueError):
    """The int8 trunk cannot be built here (library, export or a calibration record that does not fit)."""


def cpu_supports_int8() -> bool:
    """True where the CPU has int8 dot-product instructions (AVX-512 VNNI or AMX tiles) that oneDNN uses."""
    checks = ("_is_vnni_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def unavailable(device: torch.device) -> str | None:
    """Why int8 cannot run on `device` here (one line), or None when it can."""
    if device.type != "cpu":
        return f"the int8 trunk runs on the CPU only, not on {device.type}"
    if not cpu_supports_int8():
        return "this CPU has no int8 matrix instructions (AVX-512 VNNI or AMX)"
    try:
        _quantizer_api()
    except Exception as exc:  # noqa: BLE001 - missing, or an install that does not fit this torch
        from pipeline.errors import first_line

        return (f"torchao is not usable ({type(exc).__name__}: {first_line(exc)[:120]}; "
                "pip install 'videoattn-pipeline[int8]')")
    return None


def _quantizer_api():
    """torchao's PT2E entry points; imported quietly (torchao 0.18 logs a deprecation warning on import)."""
    import logging

    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    finally:
        pytree_log.setLevel(level)
    return xiq, prepare_pt2e, convert_pt2e


def _prepared(trunk: nn.Module, image_size: int) -> nn.Module:
    """The fp32 trunk exported (batch size free) with observers inserted by the X86 inductor quantizer."""
    xiq, prepare_pt2e, _ = _quantizer_api()
    example = torch.zeros(2, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(trunk, (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    return prepare_pt2e(exported, quantizer)


def _activation_observers(prepared: nn.Module) -> list[tuple[str, nn.Module]]:
    """The activation observers of a prepared graph, in graph order (weight observers follow from the weights)."""
    from torchao.quantization.pt2e.observer import HistogramObserver

    return [(name, module) for name, module in prepared.named_children() if isinstance(module, HistogramObserver)]


def _recorded(scale: float, zero_point: int):
    """An observer's calculate_qparams that gives back what a calibration recorded."""
    qparams = (torch.tensor([scale], dtype=torch.float32), torch.tensor([zero_point], dtype=torch.int32))
    return lambda: qparams


def quantize(trunk: nn.Module, image_size: int, batches: Sequence[Tensor] = (),
             qparams: Sequence[Sequence[float]] | None = None) -> tuple[nn.Module, list[list[float]]]:
    """The trunk quantised: calibrated on `batches` (normalised (B, 3, S, S) frames), or with the `qparams` a
    calibration recorded ([scale, zero_point] of every activation quantizer, in graph order). Returns an fx
    graph with quantize/dequantize pairs that inductor (freezing on) lowers to oneDNN int8 kernels, not compiled
    here, and the qparams it used. One export either way, so both give the very same graph."""
    _, _, convert_pt2e = _quantizer_api()
    prepared = _prepared(trunk, image_size)
    observers = _activation_observers(prepared)
    if qparams is not None:
        if len(observers) != len(qparams):
            raise QuantizeError(f"the calibration record has {len(qparams)} activation ranges, this trunk "
                                f"needs {len(observers)}")
        for (_, observer), (scale, zero_point) in zip(observers, qparams):
            observer.calculate_qparams = _recorded(float(scale), int(zero_point))  # what convert_pt2e asks
        # one small pass so the weight observers see the weights (activation ranges stay the recorded ones)
        batches = [torch.zeros(1, 3, image_size, image_size)]
    with torch.no_grad():
        for x in batches:
            prepared(x.float().contiguous(memory_format=torch.channels_last))
    used = []
    for _, observer in observers:
        scale, zero_point = observer.calculate_qparams()
        used.append([float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])])
    return convert_pt2e(prepared), used


def record(qparams: list[list[float]], clips: Sequence[str], frames_per_clip: int, frames_sha256: str) -> dict:
    """The cache's `quantization` setting for an int8 trunk (a dict: the cache stores it as JSON text, and its
    floats come back exactly, so equal calibrations compare equal)."""
    return {"scheme": SCHEME, "calibration": {"clips": list(clips), "frames_per_clip": frames_per_clip,
                                              "frames_sha256": frames_sha256}, "qparams": qparams}


def parse(value: Any) -> dict[str, Any]:
    """A record (dict, or its JSON text) checked to be one this code wrote; QuantizeError otherwise."""
    try:
        body = json.loads(value) if isinstance(value, str) else dict(value)
        if body.get("scheme") != SCHEME or not isinstance(body.get("qparams"), list):
            raise ValueError("another scheme")
    except (ValueError, AttributeError, TypeError):
        raise QuantizeError(f"not an int8 calibration record of this version: {str(value)[:80]!r}") from None
    return body


def short(value: Any) -> str:
    """A record as people read it: "int8, calibrated on 64 frames of 8 clips (1a2b3c4d5e6f)"."""
    if value is None or value == NONE:
        return NONE
    try:
        body = parse(value)
    except QuantizeError:
        return str(value)[:60]
    cal = body["calibration"]
    clips = len(cal.get("clips", []))
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
    return f"int8, calibrated on {clips * int(cal.get('frames_per_clip', 0))} frames of {clips} clips ({digest})"
