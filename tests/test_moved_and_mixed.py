"""Defects found by trying commands as a user types them: a moved dataset, degenerate boxes, recorded
versions, a resume at another precision."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.config import (
    EvaluateConfig,
    ExtractConfig,
    HeadConfig,
    RenderConfig,
    SplitConfig,
    SynthConfig,
    TrainConfig,
)
from pipeline.features import provenance
from pipeline.features.reader import open_cache
from stages import evaluate, extract, render, split, train


@pytest.fixture(scope="module")
def moved(tmp_path_factory) -> dict:
    """A project whose dataset folder was moved after extraction (the cache records the old absolute root)."""
    from pipeline.video.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("moved")
    old = root / "old" / "videos"
    generate_dataset(old, SynthConfig(seed=2, clips_per_class=3, frames=8, width=64, height=48),
                     classes=["move_left", "move_right"])
    cache = root / "features.h5"
    extract.run(old, cache, ExtractConfig(weights="random:0", frames=4, image_size=32, layer="conv5_3", workers=1,
                                          device="cpu"), progress=False)
    split.run(cache, root / "splits", SplitConfig(seed=0, val=0.34, test=0.34))
    model = root / "head.pt"
    train.run(cache, root / "splits", model, HeadConfig(channels=4), TrainConfig(epochs=1, batch_size=2, device="cpu"),
              metrics_path=root / "metrics" / "train.json", plots_dir=root / "plots", progress=False)
    new = root / "new" / "videos"
    new.parent.mkdir()
    shutil.move(old, new)
    return {"root": root, "cache": cache, "splits": root / "splits", "model": model, "old": old, "new": new}


def test_evaluate_says_where_it_looked_for_boxes_and_finds_them_through_data_videos(moved, tmp_path, capsys):
    report = evaluate.run(moved["cache"], moved["splits"], moved["model"], tmp_path / "a", EvaluateConfig(device="cpu"),
                          plots_dir=tmp_path / "pa", progress=False)
    assert report["attention"]["clips_with_boxes"] == 0
    assert str(moved["old"] / "boxes.json") in report["attention"]["looked_for_boxes"]
    evaluate.print_report(report)
    out = capsys.readouterr().out
    assert "looked for" in out and "boxes.json" in out and "--boxes" in out
    found = evaluate.run(moved["cache"], moved["splits"], moved["model"], tmp_path / "b", EvaluateConfig(device="cpu"),
                         plots_dir=tmp_path / "pb", progress=False, videos=moved["new"])
    assert found["attention"]["clips_with_boxes"] == found["clips"] > 0


def test_render_of_a_moved_dataset_says_so_and_draws_through_data_videos_or_the_flag(moved, tmp_path):
    cfg = RenderConfig(per_class=1, strip_frames=2, device="cpu")
    lost = render.run(moved["cache"], moved["model"], tmp_path / "r1", cfg, splits_dir=moved["splits"],
                      metrics_dir=tmp_path, train_plots=tmp_path, progress=False)
    assert lost.clips and not lost.rendered
    assert any("no dataset folder found" in note and "--videos" in note for note in lost.notes)
    for kwargs in ({"data_videos": moved["new"]}, {"videos": moved["new"]}):
        drawn = render.run(moved["cache"], moved["model"], tmp_path / "r2", cfg, splits_dir=moved["splits"],
                           metrics_dir=tmp_path, train_plots=tmp_path, progress=False, **kwargs)
        assert len(drawn.rendered) == len(drawn.clips) > 0


def test_render_cli_exits_1_in_one_line_when_no_clip_can_be_drawn(moved, tmp_path):
    from tests.cli_helpers import run_in_process

    result = run_in_process("render", str(moved["cache"]), str(moved["model"]), str(tmp_path / "r"), "--splits",
                            str(moved["splits"]), "--metrics", str(tmp_path), "--train-plots", str(tmp_path),
                            "--device", "cpu", "--no-progress")
    assert result.exit_code == 1, result.output
    assert "none of the" in result.stderr and "--videos" in result.stderr and "Traceback" not in result.output


def test_the_summary_prints_when_the_boxes_give_no_mass_ratio(capsys):
    report = {"split": "test", "clips": 2, "video_accuracy": 1.0, "frame_accuracy": 1.0, "top2_accuracy": 1.0,
              "chance": 0.5, "per_class": {}, "entropy": {"mean": 1.0, "uniform": 1.4},
              "attention": {"clips_with_boxes": 2, "mass_in_box": 0.0, "mass_in_box_uniform": 0.0, "mass_ratio": None,
                            "pointing": 0.0, "pointing_uniform": 0.0, "boxes": "b.json", "looked_for_boxes": []},
              "model": {"head": "convlstm/soft"}}
    evaluate.print_report(report)  # was: TypeError, unsupported format string passed to NoneType.__format__
    assert "degenerate" in capsys.readouterr().out


def test_the_recorded_decoder_version_is_the_module_s_own():
    import av
    import decord

    versions = provenance.versions()
    assert versions["decord"] == decord.__version__ and versions["av"] == av.__version__


def test_a_resume_at_another_precision_records_each_clip_s_precision(mini_dataset, tmp_path, monkeypatch):
    from pipeline.features import backbone

    cache = tmp_path / "f.h5"
    tiny = dict(weights="random:0", frames=4, image_size=32, workers=1, device="cpu")
    moved_away = tmp_path / "later"
    moved_away.mkdir()
    shutil.move(mini_dataset / "walk", moved_away / "walk")
    extract.run(mini_dataset, cache, ExtractConfig(precision="fp32", **tiny), progress=False)
    shutil.move(moved_away / "walk", mini_dataset / "walk")
    # the resume on a machine whose `auto` is bf16 (a pinned precision would make the fp32 rows again:
    # tests/test_reproducible.py)
    monkeypatch.setattr(backbone, "cpu_supports_bf16", lambda: True)
    summary = extract.run(mini_dataset, cache, ExtractConfig(precision="auto", **tiny), progress=False)
    assert (summary.skipped, summary.extracted) == (4, 2)  # same settings resume: precision is no setting
    with open_cache(cache) as c:
        per_clip = dict(zip(c.videos, c.precision))
        assert {v for k, v in per_clip.items() if k.startswith("walk/")} == {"bf16"}
        assert {v for k, v in per_clip.items() if not k.startswith("walk/")} == {"fp32"}
        assert c.attrs["precision"] == c.precision_summary == "mixed: bf16 2, fp32 4"
        assert np.isfinite(c.load()).all()
