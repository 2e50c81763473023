"""The frozen VGG-16 conv trunk: weights (imagenet | random:<seed> | a file), preprocessing, embedding.

Frames are resized whole to SxS (no crop: the feature grid covers the frame, so attention overlays the
whole picture), scaled to [0, 1] and normalised with ImageNet's mean/std, as the weights were trained.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.models.vgg as tv_vgg
from torch import Tensor, nn

from pipeline.config import COMPILES, PRECISIONS
from pipeline.features.weights import (
    WeightsError,
    conv_shapes,
    imagenet_state_dict,
    load_state_dict_file,
    state_dict_sha256,
)

MEAN = (0.485, 0.456, 0.406)  # ImageNet RGB, as torchvision's VGG16_Weights.IMAGENET1K_V1 expects
STD = (0.229, 0.224, 0.225)

# Cut points: slice end in torchvision's vgg16().features (31 modules; 28 = conv5_3, 29 its ReLU, 30 pool5).
LAYERS = {
    "pool5": 31,  # the whole trunk: 512 x 7 x 7 at 224
    "conv5_3": 30,  # after conv5_3's ReLU, before the last pool: 512 x 14 x 14 at 224
}


def build_trunk(layer: str = "pool5", device: str | torch.device = "cpu") -> nn.Sequential:
    """torchvision's vgg16().features up to `layer`, with no weights loaded (and no download).

    Built from torchvision's own table (cfgs["D"], the one vgg16() uses) without its 100M-parameter
    classifier, so it is exactly `vgg16(weights=None).features[:cut]`, only faster. On the "meta" device
    it costs nothing and waits for `load_state_dict(..., assign=True)`.
    """
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}: choose one of {', '.join(LAYERS)}")
    with torch.device(device):
        features = tv_vgg.make_layers(tv_vgg.cfgs["D"], batch_norm=False)
    return features[:LAYERS[layer]]


def random_state_dict(seed: int) -> dict[str, Tensor]:
    """Weights for tests: torchvision's VGG init (kaiming normal, fan_out, ReLU; zero bias) from a seed."""
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for index, (cin, cout) in conv_shapes().items():
        std = math.sqrt(2.0 / (cout * 3 * 3))  # fan_out = out_channels * kh * kw
        sd[f"{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=generator) * std
        sd[f"{index}.bias"] = torch.zeros(cout)
    return sd


def resolve_weights(spec: str) -> tuple[dict[str, Tensor], str]:
    """`imagenet` | `random:<seed>` | a path -> (trunk state_dict, label recorded in the cache)."""
    if spec == "imagenet":
        sd, _source = imagenet_state_dict()
        return sd, "imagenet"
    if spec.startswith("random:"):
        seed = spec.removeprefix("random:")
        if not seed.lstrip("-").isdigit():
            raise WeightsError(f"bad weights {spec!r}: use random:<integer seed>, e.g. random:0")
        return random_state_dict(int(seed)), f"random:{int(seed)}"
    path = Path(spec).expanduser()
    return load_state_dict_file(path), f"file:{path.name}"


def cpu_supports_bf16() -> bool:
    """True where bf16 matrix maths is native on this CPU (AVX-512 BF16 or AMX), so bf16 pays off."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available, else cpu; an explicit cuda without CUDA is the user's error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here: use auto or cpu")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 where the hardware runs it natively (CUDA with bf16, or a bf16 CPU), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = cpu_supports_bf16()
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and device.type == "cuda" and not native:
        raise ValueError("precision bf16 asked for, but this GPU has no bf16: use auto or fp32")
    return precision


# `compile: auto` compiles the trunk where it was measured to pay: a CPU running bf16 natively (AMX or AVX-512
# BF16), for a run of at least COMPILE_MIN_FRAMES frames. There inductor's frozen, pre-packed oneDNN kernels run
# well ahead of eager after a first call of several seconds, which some 500 frames win back; the threshold doubles
# that. In fp32 compiled runs as fast as eager: nothing to win, auto stays eager (docs/BENCHMARKS.md, "compiled
# trunk"). CUDA: eager under auto (not measured there); `on` compiles anywhere.
COMPILE_MIN_FRAMES = 1000


def compile_wanted(mode: str, device: torch.device, frames: int, precision: str = "bf16") -> bool:
    """Whether a run of `frames` frames on `device` at `precision` compiles its trunk under `extract.compile`."""
    if mode not in COMPILES:
        raise ValueError(f"unknown compile {mode!r}: choose one of {', '.join(COMPILES)}")
    if mode == "auto":
        return device.type == "cpu" and precision == "bf16" and cpu_supports_bf16() and frames >= COMPILE_MIN_FRAMES
    return mode == "on"


def output_shape(trunk: nn.Sequential, image_size: int) -> tuple[int, int, int]:
    """(C, h, w) of the trunk at SxS input: convs keep the size (3x3, padding 1), each 2x2 pool floors it."""
    channels, size = 3, image_size
    for module in trunk:
        if isinstance(module, nn.Conv2d):
            channels = module.out_channels
        elif isinstance(module, nn.MaxPool2d):
            size //= 2
    return channels, size, size


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse instead of handing them back to the kernel.

    A CPU batch's activations are far above glibc's mmap threshold (32 MiB at most; conv1's output alone is
    205 MB at 32 frames, 224 px, bf16), so by default every backbone call maps them fresh and unmaps them
    again, and the kernel zero-fills each page on first touch: 1.4 million page faults for four calls, about
    12% of a call's time on a 2-core bf16 machine (docs/BENCHMARKS.md, stage one). Served from the heap and
    kept there, the same memory is reused from call to call (the process holds ~0.3 GB more at its peak).
    Process-wide, so only the CPU trunk asks for it; a no-op where the C library is not glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


class Backbone:
    """The frozen trunk on its device, in eval mode, channels_last, at the chosen precision."""

    def __init__(self, weights: str = "imagenet", layer: str = "pool5", image_size: int = 224,
                 device: str = "auto", precision: str = "auto", quantization: dict | None = None) -> None:
        """`precision` int8 builds the fp32 trunk and waits for `calibrate` (extract) or a recorded
        `quantization` (a rerun, predict, watch, a Ray actor); where int8 cannot run here, one line says why
        and the backbone is what `auto` gives."""
        self.layer = layer
        self.image_size = image_size
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.quantization: str | dict = "none"  # the cache's `quantization` setting: "none" or the int8 record
        if self.precision == "int8" and (reason := _int8_unavailable(self.device)):
            _say(f"int8 is unavailable here ({reason}); extracting at "
                 f"{resolve_precision('auto', self.device)} instead")
            self.precision = resolve_precision("auto", self.device)
        trunk = build_trunk(layer, device="meta")
        self.out_shape = output_shape(trunk, image_size)  # (C, h, w)
        if self.out_shape[1] < 1:
            raise ValueError(f"image_size {image_size} is too small for {layer}: use at least 32")
        state_dict, self.weights_label = resolve_weights(weights)
        self.weights_sha256 = state_dict_sha256(state_dict)
        trunk.load_state_dict(state_dict, assign=True)
        self.trunk = self._deployed(trunk)
        self._input_dtype = self.trunk[0].weight.dtype
        self.trunk_form = "eager"  # or "compiled": what made the features, recorded per clip like precision
        self._compiled: nn.Module | None = None
        self._compiled_batch = 0
        if self.device.type == "cpu":
            keep_freed_memory()
        self._mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        if self.precision == "int8" and quantization not in (None, "none"):
            self.use_quantization(quantization)

    @property
    def needs_calibration(self) -> bool:
        """True for an int8 backbone that has no calibration yet: `calibrate` or `use_quantization` first."""
        return self.precision == "int8" and self.quantization == "none"

    def calibrate(self, frames: Tensor, clips: list[str], frames_per_clip: int, batch: int = 8) -> bool:
        """Calibrate the int8 trunk on `frames` (normalised (N, 3, S, S), chosen from `clips`) and switch to it;
        False when quantising failed here (one line said why, and the backbone is now what `auto` gives)."""
        import hashlib

        from pipeline.features import int8

        digest = hashlib.sha256(frames.float().cpu().contiguous().numpy().tobytes()).hexdigest()
        try:
            graph, qparams = int8.quantize(self.trunk, self.image_size, list(frames.split(batch)))
        except Exception as exc:  # noqa: BLE001 - export or the quantizer failing on this install
            self._int8_failed(exc)
            return False
        self._use(graph, int8.record(qparams, clips, frames_per_clip, digest))
        return True

    def use_quantization(self, record: dict) -> bool:
        """Quantise the trunk with a calibration record (`quantization` of a cache or checkpoint) and compile it
        with frozen weights; False when that failed here (one line said why; the backbone is now what `auto`
        gives). A record of another scheme is the user's error (QuantizeError, a ValueError)."""
        from pipeline.features import int8

        record = int8.parse(record)
        try:
            graph, _ = int8.quantize(self.trunk, self.image_size, qparams=record["qparams"])
        except int8.QuantizeError:
            raise
        except Exception as exc:  # noqa: BLE001 - export or the quantizer failing on this install
            self._int8_failed(exc)
            return False
        self._use(graph, record)
        return True

    def _use(self, graph: nn.Module, record: dict) -> None:
        """Run the quantised `graph` from now on, compiled with frozen weights (compiled at the first call)."""
        import torch._inductor.config as inductor

        self.trunk, self._input_dtype, self.quantization = graph, torch.float32, record
        inductor.freezing = True  # weights folded and pre-packed: what makes oneDNN run the int8 kernels
        self._compiled = torch.compile(graph, dynamic=False)
        self._compiled_batch = 0
        self.trunk_form = "compiled"

    def _int8_failed(self, exc: BaseException) -> None:
        from pipeline.errors import first_line

        fallback = resolve_precision("auto", self.device)
        _say(f"the int8 trunk cannot be built here ({type(exc).__name__}: {first_line(exc)[:160]}); "
             f"extracting at {fallback} instead")
        self.precision = fallback
        trunk = self.trunk if isinstance(self.trunk, nn.Sequential) else None
        if trunk is not None:
            self.trunk = self._deployed(trunk)
            self._input_dtype = self.trunk[0].weight.dtype

    def _deployed(self, trunk: nn.Sequential) -> nn.Sequential:
        """Frozen, eval, channels_last on the device; bf16 weights on CPU (CUDA uses autocast instead)."""
        trunk.eval().requires_grad_(False)
        dtype = torch.bfloat16 if self.precision == "bf16" and self.device.type == "cpu" else torch.float32
        return trunk.to(self.device, dtype=dtype, memory_format=torch.channels_last)

    def compile(self, mode: str, frames: int) -> bool:
        """Compile the trunk (torch.compile, inductor, weights frozen into the graph so oneDNN gets them
        pre-packed) when `compile_wanted(mode, device, frames)`; True when it will run compiled.

        Compilation happens at the first call and once only: every batch is padded to the first one's size (a
        run's batches are all `batch_size` frames but the last). Inductor keeps what it built in its on-disk
        cache (TORCHINDUCTOR_CACHE_DIR, by default under the system's temp folder), so a later run with the same
        shapes compiles faster. Where compiling is unavailable or fails, the first call says so in one line and
        the run goes on eager.
        """
        if self.precision == "int8":  # compiled whatever `mode` says: the int8 kernels exist only compiled
            return self._compiled is not None
        if not compile_wanted(mode, self.device, frames, self.precision):
            return False
        import torch._inductor.config as inductor

        inductor.freezing = True  # constants folded, weights pre-packed: the CPU gain (eager + compile alone: ~1x)
        self._compiled = torch.compile(self.trunk, dynamic=False)
        self.trunk_form = "compiled"
        return True

    def _run_compiled(self, x: Tensor) -> Tensor | None:
        """x (B, 3, S, S) channels_last through the compiled trunk in padded batches; None once it failed."""
        batch = self._compiled_batch = self._compiled_batch or x.shape[0]
        outputs = []
        try:
            for start in range(0, x.shape[0], batch):
                part = x[start:start + batch]
                short = batch - part.shape[0]
                if short:  # (batch, 3, S, S): the shape compiled, not a second compilation for the last batch
                    part = torch.cat([part, part.new_zeros((short, *part.shape[1:]))]).contiguous(
                        memory_format=torch.channels_last)
                outputs.append(self._compiled(part)[:batch - short])
        except Exception as exc:  # noqa: BLE001 - no compiler, an inductor bug: eager gives the same features
            self._compiled, self.trunk_form = None, "eager"
            _say_eager(exc)
            return None
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    @torch.inference_mode()
    def preprocess(self, frames: Tensor) -> Tensor:
        """uint8 RGB frames (B, H, W, 3), any size and device -> normalised float (B, 3, S, S) on self.device."""
        frames = torch.as_tensor(frames)
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (B, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)  # (B, 3, H, W)
        size = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)  # (B, 3, S, S)
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def forward(self, x: Tensor) -> Tensor:
        """Normalised (B, 3, S, S) -> float32 features (B, C, h, w), contiguous."""
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16" and self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = None if self._compiled is None else self._run_compiled(x)
                y = self.trunk(x) if y is None else y
        else:
            if self.needs_calibration:
                raise RuntimeError("the int8 backbone runs only once calibrated (Backbone.calibrate)")
            x = x.to(self._input_dtype)
            y = None if self._compiled is None else self._run_compiled(x)
            y = self.trunk(x) if y is None else y
        return y.float().contiguous()  # (B, C, h, w)

    def embed(self, frames: Tensor) -> Tensor:
        """uint8 RGB frames (B, H, W, 3) -> float32 features (B, C, h, w)."""
        return self.forward(self.preprocess(frames))

    def provenance(self) -> dict:
        """What a cache records so later stages can show, and refuse to mix, how features were made."""
        return {"backbone": "vgg16", "layer": self.layer, "weights": self.weights_label,
                "weights_sha256": self.weights_sha256, "image_size": self.image_size,
                "mean": list(MEAN), "std": list(STD), "precision": self.precision,
                "quantization": self.quantization}


def _int8_unavailable(device: torch.device) -> str | None:
    from pipeline.features.int8 import unavailable

    return unavailable(device)


def _say(text: str) -> None:
    """One yellow note line on stderr (markup in `text` is shown as text)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[yellow]note[/] {escape(text)}", highlight=False)


def _say_eager(exc: BaseException) -> None:
    from pipeline.errors import first_line

    _say(f"the compiled trunk is unavailable here ({type(exc).__name__}: {first_line(exc)[:200]}); "
         "extracting eager (extract.compile: off skips the attempt)")
