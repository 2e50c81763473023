"""predict: same extraction as the cache, per-file failures, refusal of a changed backbone, --render, --json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ExtractConfig, HeadConfig, PredictConfig, SplitConfig, SynthConfig, TrainConfig
from pipeline.features.reader import open_cache
from pipeline.head import checkpoint as ck
from pipeline.video.synthetic import generate_dataset
from stages import extract, predict, split, train
from stages.predict import PredictError
from tests.cli_helpers import run_cli, run_in_process

CLASSES = ["move_right", "move_left", "move_up"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """3 classes x 3 synthetic clips (one per split), extracted with random weights, a head trained 1 epoch."""
    root = tmp_path_factory.mktemp("predict")
    videos = root / "videos"
    generate_dataset(videos, SynthConfig(seed=1, clips_per_class=3, frames=12, width=64, height=48), classes=CLASSES)
    cache = root / "features.h5"
    extract.run(videos, cache, ExtractConfig(weights="random:0", frames=4, image_size=64, batch_size=16, workers=2,
                                             timeout=30.0, device="cpu"), progress=False)
    split.run(cache, root / "splits", SplitConfig(seed=0, val=0.34, test=0.34))
    model = root / "head.pt"
    train.run(cache, root / "splits", model, HeadConfig(channels=8), TrainConfig(epochs=1, batch_size=4, device="cpu"),
              metrics_path=root / "metrics" / "train.json", plots_dir=root / "plots", progress=False)
    return {"root": root, "videos": videos, "cache": cache, "model": model}


def head_on_cached(trained: dict[str, Path], video: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(video probabilities, attention, frame_index) of the head applied to the cached features of `video`."""
    import torch

    model = ck.load(trained["model"]).build()
    with open_cache(trained["cache"]) as cache:
        row = cache.indices([video])[0]
        feats, index = cache.load([row]), cache.frame_index[row]
    with torch.inference_mode():
        out = model(torch.from_numpy(feats))
    probs = torch.softmax(out.logits.float(), -1).mean(1)[0].numpy()
    return probs, out.attention[0].numpy(), index


def test_predict_on_a_cached_clip_reproduces_the_head_on_its_cached_features(trained):
    """Same frames, same backbone, same float16 rounding, same head: the cache's answer, within fp16."""
    with open_cache(trained["cache"]) as cache:
        keys = list(cache.videos)[:2]
    classes = ck.load(trained["model"]).classes
    preds = predict.run([trained["videos"] / k for k in keys], trained["model"],
                        PredictConfig(top_k=50, device="cpu"), progress=False)
    for key, pred in zip(keys, preds):
        probs, attention, index = head_on_cached(trained, key)
        assert pred.ok and pred.file == trained["videos"] / key
        np.testing.assert_array_equal(pred.frame_index, index)
        np.testing.assert_allclose(pred.probabilities, probs, atol=2e-3)
        np.testing.assert_allclose(pred.attention, attention, atol=2e-3)
        assert pred.attention.shape == (4, 2, 2)
        assert len(pred.topk) == 3  # top-50 clamped to the model's classes
        assert [c for c, _ in pred.topk] == [classes[i] for i in np.argsort(-probs, kind="stable")]
        assert sum(p for _, p in pred.topk) == pytest.approx(1.0, abs=1e-5)


def test_top_k_must_be_positive(trained):
    with pytest.raises(PredictError, match="top-k"):
        predict.run([trained["videos"]], trained["model"], PredictConfig(top_k=0, device="cpu"),
                    progress=False)


def test_bad_files_are_recorded_failures_and_the_others_are_predicted(trained, tmp_path):
    good = sorted(trained["videos"].glob("move_right/*"))[0]
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 20)
    missing = tmp_path / "gone.mkv"
    out = tmp_path / "out" / "pred.json"
    result = run_cli("predict", str(good), str(empty), str(text), str(missing), "--model", str(trained["model"]),
                     "--top-k", "2", "--device", "cpu", "--no-progress", "--json", str(out))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    rows = {name: [line for line in result.stdout.splitlines() if name in line]
            for name in (good.name, "empty.avi", "notes.mp4", "gone.mkv")}
    assert all(len(lines) == 1 for lines in rows.values()), result.stdout  # one table row per file
    assert "failed" not in rows[good.name][0] and "%" in rows[good.name][0]
    assert "failed" in rows["empty.avi"][0] and "empty file" in rows["empty.avi"][0]
    assert "failed" in rows["notes.mp4"][0] and "not a readable video" in rows["notes.mp4"][0]
    assert "failed" in rows["gone.mkv"][0] and "not found" in rows["gone.mkv"][0]
    saved = json.loads(out.read_text())
    assert [p["file"] for p in saved["predictions"]] == [str(good)]
    assert len(saved["predictions"][0]["topk"]) == 2 and len(saved["predictions"][0]["frame_index"]) == 4
    assert saved["predictions"][0]["decoder"] in ("decord", "pyav")
    assert {f["file"] for f in saved["failed"]} == {str(empty), str(text), str(missing)}
    assert not list(out.parent.glob("*.tmp"))


def test_every_file_failing_is_exit_2(trained, tmp_path):
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    result = run_in_process("predict", str(empty), "--model", str(trained["model"]), "--device", "cpu",
                            "--no-progress")
    assert result.exit_code == 2 and "empty file" in result.stdout
    assert isinstance(result.exception, SystemExit)  # not an escaped exception


def _rewrite_checkpoint(src: Path, dst: Path, **extraction) -> Path:
    import torch

    payload = torch.load(src, map_location="cpu", weights_only=True)
    payload["extraction"] = {**payload["extraction"], **extraction}
    torch.save(payload, dst)
    return dst


def test_a_backbone_that_no_longer_matches_the_checkpoint_is_one_line_and_exit_2(trained, tmp_path):
    recorded = ck.load(trained["model"]).extraction["weights"]
    label = recorded.split(" sha256:")[0]
    model = _rewrite_checkpoint(trained["model"], tmp_path / "changed.pt", weights=f"{label} sha256:{'0' * 64}")
    clip = next(trained["videos"].glob("move_up/*"))
    with pytest.raises(PredictError, match="would not make the features.*weights"):
        predict.run([clip], model, PredictConfig(device="cpu"), progress=False)
    result = run_cli("predict", str(clip), "--model", str(model), "--device", "cpu", "--no-progress")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "weights" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) <= 2  # one (soft-wrapped) message


def test_weights_recorded_as_a_file_need_that_file_and_its_hash(trained, tmp_path):
    import torch

    from pipeline.features.backbone import random_state_dict

    recorded = ck.load(trained["model"]).extraction["weights"]
    digest = recorded.split(" sha256:")[1]
    model = _rewrite_checkpoint(trained["model"], tmp_path / "file.pt", weights=f"file:vgg.pth sha256:{digest}")
    clip = next(trained["videos"].glob("move_up/*"))
    with pytest.raises(PredictError, match="--weights"):
        predict.run([clip], model, PredictConfig(device="cpu"), progress=False)
    same, other = tmp_path / "vgg.pth", tmp_path / "other.pth"
    torch.save(random_state_dict(0), same)
    torch.save(random_state_dict(1), other)
    [pred] = predict.run([clip], model, PredictConfig(device="cpu"), progress=False, weights=str(same))
    assert pred.ok
    with pytest.raises(PredictError, match="weights"):
        predict.run([clip], model, PredictConfig(device="cpu"), progress=False, weights=str(other))


def test_imagenet_weights_missing_offline_is_the_weights_error_and_never_a_download(trained, tmp_path, monkeypatch):
    from pipeline.features import weights
    from pipeline.features.weights import WeightsError

    monkeypatch.setattr(weights, "checkpoint_dir", lambda: tmp_path / "empty-hub")
    monkeypatch.setattr(weights, "fetch_imagenet_weights", lambda *a, **k: pytest.fail("predict must not download"))
    recorded = ck.load(trained["model"]).extraction["weights"]
    model = _rewrite_checkpoint(trained["model"], tmp_path / "inet.pt",
                                weights="imagenet sha256:" + recorded.split(" sha256:")[1])
    with pytest.raises(WeightsError, match="python -m pipeline weights"):
        predict.run([trained["videos"]], model, PredictConfig(device="cpu"), progress=False)


def test_other_recorded_settings_are_refused_too(trained, tmp_path):
    clip = next(trained["videos"].glob("move_up/*"))
    model = _rewrite_checkpoint(trained["model"], tmp_path / "sampling.pt", sampling="random frames")
    with pytest.raises(PredictError, match="sampling"):
        predict.run([clip], model, PredictConfig(device="cpu"), progress=False)
    model = _rewrite_checkpoint(trained["model"], tmp_path / "size.pt", image_size=96)  # head trained on 2x2
    with pytest.raises(PredictError, match="inconsistent"):
        predict.run([clip], model, PredictConfig(device="cpu"), progress=False)


def test_a_file_that_is_not_a_checkpoint_is_one_line_and_exit_2(trained, tmp_path):
    clip = next(trained["videos"].glob("move_up/*"))
    text, garbage = tmp_path / "head.pt", tmp_path / "noise.pt"
    text.write_text("hello")
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for model in (text, garbage, tmp_path / "absent.pt", trained["cache"]):
        result = run_in_process("predict", str(clip), "--model", str(model), "--device", "cpu", "--no-progress")
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (model, result.output)
        assert "error:" in result.output and model.name in result.output
        assert len(result.output.strip().splitlines()) <= 2, result.output


def test_a_folder_stands_for_its_videos(trained):
    preds = predict.run([trained["videos"] / "move_left"], trained["model"], PredictConfig(device="cpu"),
                        progress=False)
    assert len(preds) == 3 and all(p.ok for p in preds)
    assert all(p.file.parent.name == "move_left" for p in preds)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_prediction_matches_the_cpu_one(trained):
    clip = sorted(trained["videos"].glob("move_left/*"))[0]
    [cpu] = predict.run([clip], trained["model"], PredictConfig(device="cpu"), progress=False)
    [gpu] = predict.run([clip], trained["model"], PredictConfig(device="cuda"), progress=False)
    assert gpu.ok and cpu.ok
    np.testing.assert_allclose(gpu.probabilities, cpu.probabilities, atol=2e-2)
    np.testing.assert_allclose(gpu.attention, cpu.attention, atol=2e-2)


def test_render_writes_a_strip_and_an_animation_per_predicted_file(trained, tmp_path):
    clips = sorted(trained["videos"].glob("move_right/*"))[:2]
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    out = tmp_path / "render"
    preds = predict.run([*clips, empty], trained["model"], PredictConfig(device="cpu"), render_dir=out, progress=False)
    assert [p.ok for p in preds] == [True, True, False]
    for pred in preds[:2]:
        assert set(pred.rendered) == {"strip", "animation"}
        assert pred.rendered["strip"].is_file() and pred.rendered["animation"].is_file()
        assert pred.rendered["strip"].parent == out
    assert preds[2].rendered == {}
    assert len({p.rendered["strip"] for p in preds[:2]}) == 2


def test_rendered_names_are_unique_and_say_which_folder_where_stems_repeat():
    files = [Path("a/run/clip_1.avi"), Path("b/walk/clip_1.mp4"), Path("c/x.avi"), Path("d/run/clip_1.mkv")]
    assert predict.unique_names(files) == {files[0]: "run-clip_1", files[1]: "walk-clip_1", files[2]: "x",
                                           files[3]: "run-clip_1-2"}
