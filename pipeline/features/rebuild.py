"""The backbone a head's features were made with, rebuilt from its checkpoint's record and checked to make
the very same features (weights and their sha256, layer, image size, frames, sampling, precision): a head
fed features made another way gives confident nonsense, so anything that differs is refused.
"""
from __future__ import annotations

from typing import Any

from pipeline.errors import UserError, first_line


class PredictError(UserError):
    """Prediction cannot start: the model, its backbone or an option; the message says what to do."""


def _weights_spec(recorded: str, override: str | None) -> tuple[str, str]:
    """(spec to build the backbone from, label to compare) for a recorded "<label> sha256:<hex>".

    A file is recorded by its name only, so it must be pointed at again (`--weights PATH`); its sha256 still
    has to match. ImageNet weights are only read from the local hub cache: predict never downloads.
    """
    label = recorded.split(" sha256:", 1)[0]
    if override is not None:
        return override, label
    if label.startswith("file:"):
        raise PredictError(f"the model's features were extracted with the weights file {label[5:]!r}: "
                           "pass --weights PATH to that file")
    if label == "imagenet":
        from pipeline.features.weights import cached_weights_file, imagenet_state_dict

        if cached_weights_file() is None:
            imagenet_state_dict(allow_download=False)  # raises WeightsError saying what to run
    return label, label


def _precision(recorded: Any, device: str) -> str:
    """The recorded precision where this device runs it; fp32 (the exact one) where it cannot."""
    from pipeline.features.backbone import resolve_device, resolve_precision

    precision = recorded if recorded in ("fp32", "bf16", "int8") else "auto"
    try:
        resolve_precision(precision, resolve_device(device))
    except ValueError:
        return "fp32"
    return precision


def rebuild_backbone(extraction: dict[str, Any], device: str, weights: str | None = None,
                     feature_shape: list[int] | None = None, source: str = ""):
    """The backbone of `extraction` (a checkpoint's record), checked to make the very same features, and, given
    the checkpoint's `feature_shape` [T, C, h, w] (from file `source`), to make features of that shape."""
    from pipeline.features.backbone import Backbone
    from pipeline.features.int8 import QuantizeError
    from pipeline.features.provenance import extraction_settings, settings_mismatch
    from pipeline.features.weights import WeightsError

    spec, label = _weights_spec(str(extraction.get("weights", "")), weights)
    try:
        precision = _precision(extraction.get("precision"), device)
        quantization = extraction.get("quantization") if precision == "int8" else None
        backbone = Backbone(spec, str(extraction.get("layer")), int(extraction.get("image_size") or 0), device,
                            precision, quantization)
    except WeightsError as exc:
        raise PredictError(f"cannot rebuild the model's backbone: {first_line(exc, 200)}") from None
    except (ValueError, TypeError, QuantizeError) as exc:
        raise PredictError(f"cannot rebuild the model's backbone ({first_line(exc, 200)})") from None
    frames = int(extraction.get("frames") or 0)
    made = extraction_settings(backbone.provenance(), frames, label)
    if precision == "int8" and backbone.precision != "int8":  # int8 unavailable here (one line said so): the
        made["quantization"] = extraction.get("quantization")  # fallback's features are the closer to fp32 ones
    diffs = settings_mismatch(extraction, made)
    if diffs:
        detail = "; ".join(d.replace("cache has", "model has").replace("asked for", "here") for d in diffs[:3])
        raise PredictError(f"this backbone would not make the features the model was trained on ({detail}); "
                           "use the weights it was extracted with, or retrain")
    if feature_shape is not None and [frames, *backbone.out_shape] != list(feature_shape):
        raise PredictError(f"{source}: its backbone gives features {[frames, *backbone.out_shape]}, its head "
                           f"expects {list(feature_shape)}: the checkpoint is inconsistent; retrain")
    return backbone
