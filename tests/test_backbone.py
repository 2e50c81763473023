"""The frozen VGG-16 trunk: cut points and shapes, weights specs, preprocessing, precision."""
from __future__ import annotations

import pytest
import torch
import torchvision

from pipeline.features import backbone
from pipeline.features.backbone import MEAN, STD, Backbone, build_trunk, resolve_weights
from pipeline.features.weights import WeightsError, state_dict_sha256

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def fp32_64() -> Backbone:
    return Backbone("random:0", layer="conv5_3", image_size=64, device="cpu", precision="fp32")


def frames(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 RGB frames (B, H, W, 3): blobs, not pixel noise, so features vary like images."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(height // 8, 2), max(width // 8, 2), generator=g)  # (B, 3, h, w)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return (smooth.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def test_trunk_is_torchvisions_vgg16_features_cut_at_the_layer():
    with torch.device("meta"):
        reference = torchvision.models.vgg16(weights=None).features

    assert str(build_trunk("pool5")) == str(reference)
    assert str(build_trunk("conv5_3")) == str(reference[:30])
    assert isinstance(build_trunk("conv5_3")[-1], torch.nn.ReLU)


@pytest.mark.parametrize("layer, size, shape", [
    ("pool5", 224, (512, 7, 7)), ("conv5_3", 224, (512, 14, 14)),
    ("pool5", 112, (512, 3, 3)), ("conv5_3", 112, (512, 7, 7)),
])
def test_output_shape_at_the_design_sizes(layer, size, shape):
    assert backbone.output_shape(build_trunk(layer, device="meta"), size) == shape


@pytest.mark.parametrize("layer", ["pool5", "conv5_3"])
def test_features_have_the_announced_shape(layer):
    model = Backbone("random:0", layer=layer, image_size=112, device="cpu", precision="fp32")

    features = model.embed(frames(2, 90, 120))

    assert features.shape == (2, *model.out_shape)
    assert features.dtype == torch.float32 and features.is_contiguous()


def test_too_small_image_size_is_refused():
    with pytest.raises(ValueError, match="too small"):
        Backbone("random:0", layer="pool5", image_size=16, device="cpu")


def test_random_weights_are_deterministic_and_depend_on_the_seed():
    a, label = resolve_weights("random:0")
    b, _ = resolve_weights("random:0")
    c, _ = resolve_weights("random:1")

    assert label == "random:0"
    assert state_dict_sha256(a) == state_dict_sha256(b) != state_dict_sha256(c)


def test_random_weights_give_live_features_after_five_pools():
    model = Backbone("random:3", layer="pool5", image_size=64, device="cpu", precision="fp32")

    features = model.embed(frames(2, 64, 64))  # (2, 512, 2, 2)

    assert torch.isfinite(features).all()
    assert (features > 0).float().mean() > 0.2
    assert features.std() > 1e-3
    assert not torch.equal(features[0], features[1])


def test_weights_from_a_file_are_labelled_by_file_name(tmp_path):
    sd, _ = resolve_weights("random:5")
    torch.save({f"features.{k}": v for k, v in sd.items()}, tmp_path / "my-vgg.pth")

    loaded, label = resolve_weights(str(tmp_path / "my-vgg.pth"))

    assert label == "file:my-vgg.pth"
    assert state_dict_sha256(loaded) == state_dict_sha256(sd)


@pytest.mark.parametrize("spec", ["random:abc", "no/such/file.pth"])
def test_bad_weights_spec_is_a_weights_error(spec):
    with pytest.raises(WeightsError):
        resolve_weights(spec)


def test_constant_colour_frame_normalises_to_imagenet_values(fp32_64):
    colour = torch.tensor([255, 128, 0], dtype=torch.uint8)
    frame = colour.expand(1, 37, 53, 3)  # odd, non-square

    x = fp32_64.preprocess(frame)

    expected = (colour.float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert x.shape == (1, 3, 64, 64)
    torch.testing.assert_close(x, expected.view(1, 3, 1, 1).expand(1, 3, 64, 64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("height, width", [(64, 64), (480, 640), (31, 97), (1, 1)])
def test_any_frame_size_is_resized_whole_to_the_square(fp32_64, height, width):
    assert fp32_64.preprocess(frames(3, height, width)).shape == (3, 3, 64, 64)


def test_resize_keeps_the_whole_frame_without_cropping(fp32_64):
    frame = torch.zeros(1, 40, 160, 3, dtype=torch.uint8)
    frame[:, :, :20] = 255  # a white band on the left eighth, which a centre crop would lose

    x = fp32_64.preprocess(frame)

    white = (1 - MEAN[0]) / STD[0]
    assert x[0, 0, :, :6].min() > white - 1e-4  # the band fills the left columns of the square


def test_float_frames_are_refused(fp32_64):
    with pytest.raises(ValueError, match="uint8"):
        fp32_64.preprocess(torch.zeros(1, 8, 8, 3))


def test_auto_precision_on_cpu_follows_native_bf16_support():
    assert backbone.resolve_precision("auto", torch.device("cpu")) == (
        "bf16" if backbone.cpu_supports_bf16() else "fp32")
    assert isinstance(backbone.cpu_supports_bf16(), bool)


def test_forced_bf16_on_cpu_stays_close_to_fp32(fp32_64):
    bf16 = Backbone("random:0", layer="conv5_3", image_size=64, device="cpu", precision="bf16")
    x = fp32_64.preprocess(frames(1, 64, 64))

    reference, approx = fp32_64.forward(x), bf16.forward(x)

    assert approx.dtype == torch.float32
    assert ((approx - reference).norm() / reference.norm()).item() < 0.03


def test_provenance_names_everything_that_changes_the_features(fp32_64):
    p = fp32_64.provenance()

    assert p == {"backbone": "vgg16", "layer": "conv5_3", "weights": "random:0",
                 "weights_sha256": fp32_64.weights_sha256, "image_size": 64, "mean": list(MEAN),
                 "std": list(STD), "precision": "fp32", "quantization": "none"}


def test_unknown_options_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown layer"):
        build_trunk("fc7")
    with pytest.raises(ValueError, match="unknown precision"):
        backbone.resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        backbone.resolve_device("cuda")


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_autocast_matches_cpu_fp32(fp32_64):
    gpu = Backbone("random:0", layer="conv5_3", image_size=64, device="cuda", precision="auto")
    batch = frames(4, 120, 160)

    reference, features = fp32_64.embed(batch), gpu.embed(batch.cuda())

    assert gpu.device.type == "cuda" and gpu.precision == "bf16"
    assert features.device.type == "cuda" and features.dtype == torch.float32
    assert ((features.cpu() - reference).norm() / reference.norm()).item() < 0.03


# --- the compiled trunk (extract.compile) -------------------------------------------------------------------


def test_auto_compiles_a_native_bf16_cpu_run_with_frames_enough_to_win_it_back(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(backbone, "cpu_supports_bf16", lambda: True)
    assert not backbone.compile_wanted("auto", cpu, backbone.COMPILE_MIN_FRAMES - 1, "bf16")
    assert backbone.compile_wanted("auto", cpu, backbone.COMPILE_MIN_FRAMES, "bf16")
    assert not backbone.compile_wanted("auto", cpu, 10**6, "fp32")  # measured: no gain in fp32
    assert not backbone.compile_wanted("auto", cuda, 10**6, "bf16")  # unmeasured there: eager unless asked
    monkeypatch.setattr(backbone, "cpu_supports_bf16", lambda: False)
    assert not backbone.compile_wanted("auto", cpu, 10**6, "bf16")  # emulated bf16: slow either way
    assert backbone.compile_wanted("on", cpu, 1) and not backbone.compile_wanted("off", cpu, 10**6)
    with pytest.raises(ValueError, match="compile"):
        backbone.compile_wanted("yes", cpu, 1)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_features_equal_eager_ones_and_the_short_last_batch_compiles_nothing_new(precision):
    import torch._dynamo

    eager = Backbone("random:0", layer="conv5_3", image_size=64, device="cpu", precision=precision)
    compiled = Backbone("random:0", layer="conv5_3", image_size=64, device="cpu", precision=precision)
    assert compiled.compile("on", 1) and compiled.trunk_form == "compiled" and eager.trunk_form == "eager"
    x = eager.preprocess(frames(11, 48, 64))
    torch._dynamo.utils.counters.clear()
    got = torch.cat([compiled.forward(x[:8]), compiled.forward(x[8:])])  # a batch of 8, then a short one of 3
    want = eager.forward(x)
    tolerance = 1e-4 if precision == "fp32" else 2e-2  # bf16: ~3 significant digits
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one shape compiled, the last padded


def test_a_trunk_that_cannot_compile_says_so_in_one_line_and_runs_eager(fp32_64, monkeypatch, capsys):
    def broken(module, **kwargs):
        def fails(x):
            raise RuntimeError("Compiler: cc not found\nmore detail")
        return fails

    monkeypatch.setattr(torch, "compile", broken)
    model = Backbone("random:0", layer="conv5_3", image_size=64, device="cpu", precision="fp32")
    assert model.compile("on", 1)
    x = model.preprocess(frames(4, 48, 64))
    torch.testing.assert_close(model.forward(x), fp32_64.forward(x))
    assert model.trunk_form == "eager"  # what the cache will record for these clips
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "compiled trunk is unavailable" in lines[0] and "cc not found" in lines[0]
    model.forward(x)
    assert not capsys.readouterr().err  # said once
