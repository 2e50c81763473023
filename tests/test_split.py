"""The split stage: stratified and official (HMDB-51, UCF-101) splits, left-out accounting, split files, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import SplitConfig
from pipeline.features.shards import ClipFeatures, join, write_shard
from pipeline.video.splits import (
    FAILED,
    NOT_IN_CACHE,
    UNLISTED,
    UNUSED,
    SplitError,
    class_of,
    hmdb51,
    read_split,
    stratified,
    ucf101,
    write_splits,
)
from stages import split as stage
from tests.cli_helpers import run_cli


def make_cache(folder: Path, keys: list[str], failed: list[tuple[str, str]] = ()) -> Path:
    """A joined cache holding `keys` (tiny (2, 4, 1, 1) features) and the given failures."""
    settings = {"frames": 2, "dtype": "float16"}
    rows = [ClipFeatures(key, class_of(key), np.zeros((2, 4, 1, 1), np.float16), np.arange(2, dtype=np.int32),
                         2, 25.0, 8, 8) for key in keys]
    write_shard(folder / "f.h5.parts", rows, list(failed), settings)
    join(folder / "f.h5", folder / "f.h5.parts", settings)
    return folder / "f.h5"


def clips(per_class: dict[str, int], start: int = 0) -> list[str]:
    return [f"{cls}/{cls}_{i:04d}.avi" for cls, n in per_class.items() for i in range(start, start + n)]


def write_hmdb51(folder: Path, marks: dict[str, dict[str, int]], fold: int = 1) -> Path:
    """HMDB-51 split files: {class: {clip file: 0|1|2}} -> <class>_test_split<fold>.txt (with trailing spaces)."""
    folder.mkdir(parents=True, exist_ok=True)
    for cls, clip_marks in marks.items():
        (folder / f"{cls}_test_split{fold}.txt").write_text("".join(f"{c} {m} \n" for c, m in clip_marks.items()))
    return folder


# --- stratified -----------------------------------------------------------------------------------------


def test_stratified_split_gives_each_class_its_ratio_and_uses_every_clip_once():
    videos = clips({"jump": 100, "run": 50, "walk": 20})
    splits = stratified(videos, [class_of(v) for v in videos], val=0.2, test=0.1, seed=0)
    counts = {name: {c: sum(class_of(k) == c for k in keys) for c in ("jump", "run", "walk")}
              for name, keys in splits.items()}
    assert counts["test"] == {"jump": 10, "run": 5, "walk": 2}
    assert counts["val"] == {"jump": 20, "run": 10, "walk": 4}
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(videos)
    assert all(keys == sorted(keys) for keys in splits.values())


def test_stratified_split_is_the_same_for_the_same_seed_and_differs_for_another():
    videos = clips({"jump": 40, "run": 40})
    labels = [class_of(v) for v in videos]
    first = stratified(videos, labels, 0.21, 0.08, seed=3)
    assert stratified(list(reversed(videos)), list(reversed(labels)), 0.21, 0.08, seed=3) == first
    assert stratified(videos, labels, 0.21, 0.08, seed=4)["test"] != first["test"]


def test_adding_ten_percent_more_clips_keeps_most_clips_where_they_were():
    old = clips({c: 100 for c in ("a", "b", "c", "d", "e")})
    new = old + clips({c: 10 for c in ("a", "b", "c", "d", "e")}, start=100)
    before = stratified(old, [class_of(v) for v in old], 0.21, 0.08, seed=0)
    after = stratified(new, [class_of(v) for v in new], 0.21, 0.08, seed=0)
    for name in ("test", "val", "train"):
        kept = len(set(before[name]) & set(after[name])) / len(before[name])
        assert kept >= 0.85, f"only {kept:.0%} of the old {name} clips stayed in {name}"


def test_every_class_with_three_clips_gets_one_val_and_one_test_clip():
    videos = clips({"a": 3, "b": 4, "c": 5})
    splits = stratified(videos, [class_of(v) for v in videos], 0.21, 0.08, seed=0)
    for cls in ("a", "b", "c"):
        assert [sum(class_of(k) == cls for k in splits[name]) >= 1 for name in ("train", "val", "test")] == [True] * 3


def test_too_few_clips_for_a_test_split_is_an_error_that_says_so():
    videos = clips({"a": 2, "b": 2})
    with pytest.raises(SplitError, match="test splits? (is|are) empty.*too few"):
        stratified(videos, [class_of(v) for v in videos], 0.21, 0.08, seed=0)


@pytest.mark.parametrize("val, test", [(0.6, 0.4), (-0.1, 0.1), (0.2, 1.0)])
def test_ratios_that_leave_no_train_or_are_out_of_range_are_refused(val, test):
    videos = clips({"a": 20})
    with pytest.raises(SplitError, match="ratio|train"):
        stratified(videos, [class_of(v) for v in videos], val, test, seed=0)


# --- HMDB-51 --------------------------------------------------------------------------------------------


def test_hmdb51_lists_put_1_in_train_2_in_test_skip_0_and_carve_val_from_train(tmp_path):
    videos = clips({"brush_hair": 30, "cartwheel": 30})
    marks = {cls: {f"{cls}_{i:04d}.avi": (1 if i < 20 else 2 if i < 27 else 0) for i in range(30)}
             for cls in ("brush_hair", "cartwheel")}
    folder = write_hmdb51(tmp_path / "splits", marks)
    result = hmdb51(folder, 1, videos, ["brush_hair", "cartwheel"], val=0.25, seed=0)
    marked = {f"{cls}/{clip}": m for cls, cm in marks.items() for clip, m in cm.items()}
    assert {marked[k] for k in result.splits["test"]} == {2} and len(result.splits["test"]) == 14
    assert {marked[k] for k in result.splits["train"] + result.splits["val"]} == {1}
    assert len(result.splits["val"]) == 10 and len(result.splits["train"]) == 30
    assert result.left_out[UNUSED] == 6 and result.left_out[UNLISTED] == 6


def test_hmdb51_clips_that_failed_or_were_never_extracted_are_left_out_and_counted(tmp_path):
    videos = clips({"jump": 10})
    marks = {"jump": {**{f"jump_{i:04d}.avi": 1 if i < 7 else 2 for i in range(10)},
                      "jump_broken.avi": 2, "jump_gone1.avi": 1, "jump_gone2.avi": 2}}
    folder = write_hmdb51(tmp_path / "splits", marks)
    result = hmdb51(folder, 1, videos, ["jump"], failed=["jump/jump_broken.avi"])
    assert (result.left_out[FAILED], result.left_out[NOT_IN_CACHE]) == (1, 2)
    assert "jump/jump_broken.avi" not in sum(result.splits.values(), [])


def test_missing_hmdb51_split_file_names_the_file_expected(tmp_path):
    folder = write_hmdb51(tmp_path / "splits", {"jump": {"jump_0000.avi": 1}}, fold=2)
    with pytest.raises(SplitError, match=r"run_test_split2\.txt: no such split file"):
        hmdb51(folder, 2, clips({"jump": 3, "run": 3}), ["jump", "run"])


def test_hmdb51_lists_of_classes_the_cache_lacks_are_refused_naming_them(tmp_path):
    folder = write_hmdb51(tmp_path / "splits", {c: {f"{c}_0000.avi": 1} for c in ("jump", "smoke", "kiss")})
    with pytest.raises(SplitError, match="2 class\\(es\\) the cache does not hold: kiss, smoke"):
        hmdb51(folder, 1, clips({"jump": 3}), ["jump"])


def test_hmdb51_class_whose_every_clip_failed_is_counted_not_refused(tmp_path):
    folder = write_hmdb51(tmp_path / "splits", {"jump": {f"jump_{i:04d}.avi": 1 + (i % 2) for i in range(6)},
                                                 "smoke": {"smoke_0000.avi": 1}})
    result = hmdb51(folder, 1, clips({"jump": 6}), ["jump"], failed=["smoke/smoke_0000.avi"])
    assert result.left_out[FAILED] == 1


def test_malformed_hmdb51_line_is_reported_with_file_and_line(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "jump_test_split1.txt").write_text("jump_0000.avi 1\njump_0001.avi 7\n")
    with pytest.raises(SplitError, match=r"jump_test_split1\.txt:2: expected"):
        hmdb51(folder, 1, clips({"jump": 2}), ["jump"])


def test_official_split_with_no_test_clip_in_the_cache_is_an_error(tmp_path):
    marks = {"jump": {**{f"jump_{i:04d}.avi": 1 for i in range(5)}, "jump_elsewhere.avi": 2}}
    folder = write_hmdb51(tmp_path / "splits", marks)
    with pytest.raises(SplitError, match="test split is empty.*1 not in cache"):
        hmdb51(folder, 1, clips({"jump": 5}), ["jump"])


# --- UCF-101 --------------------------------------------------------------------------------------------


def write_ucf101(folder: Path, train: list[str], test: list[str], fold: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"trainlist0{fold}.txt").write_text("".join(f"{k} 37\r\n" for k in train))
    (folder / f"testlist0{fold}.txt").write_text("".join(f"{k}\r\n" for k in test))
    return folder


def test_ucf101_lists_match_the_handstandpushups_class_despite_its_spelling(tmp_path):
    videos = [f"HandstandPushups/v_HandStandPushups_g{g:02d}_c01.avi" for g in range(1, 11)] + \
             [f"ApplyEyeMakeup/v_ApplyEyeMakeup_g{g:02d}_c01.avi" for g in range(1, 11)]
    listed = [v.replace("HandstandPushups/", "HandStandPushups/") for v in videos]
    is_test = [("_g08" in k or "_g09" in k or "_g10" in k) for k in listed]
    folder = write_ucf101(tmp_path / "ucfTrainTestlist", [k for k, t in zip(listed, is_test) if not t],
                          [k for k, t in zip(listed, is_test) if t])
    result = ucf101(folder, 1, videos, ["ApplyEyeMakeup", "HandstandPushups"], val=0.25, seed=0)
    assert "HandstandPushups/v_HandStandPushups_g08_c01.avi" in result.splits["test"]
    assert len(result.splits["test"]) == 6
    assert len(result.splits["train"]) + len(result.splits["val"]) == 14 and len(result.splits["val"]) == 4
    assert set(result.splits["train"] + result.splits["val"] + result.splits["test"]) == set(videos)
    assert result.left_out == {FAILED: 0, NOT_IN_CACHE: 0, UNLISTED: 0}


def test_ucf101_missing_testlist_names_the_file_expected(tmp_path):
    folder = tmp_path / "ucfTrainTestlist"
    folder.mkdir()
    (folder / "trainlist02.txt").write_text("Jump/v_Jump_g01_c01.avi 1\n")
    with pytest.raises(SplitError, match=r"testlist02\.txt: no such split list"):
        ucf101(folder, 2, ["Jump/v_Jump_g01_c01.avi"], ["Jump"])


def test_ucf101_lists_naming_unknown_classes_are_refused_unless_those_clips_merely_failed(tmp_path):
    videos = clips({"Jump": 6})
    folder = write_ucf101(tmp_path / "lists", videos[:4] + ["Fly/v_Fly_g01_c01.avi", "Swim/v_Swim_g01_c01.avi"],
                          videos[4:])
    with pytest.raises(SplitError, match="class\\(es\\) the cache does not hold: Fly, Swim"):
        ucf101(folder, 1, videos, ["Jump"])
    result = ucf101(folder, 1, videos, ["Jump"], failed=["Fly/v_Fly_g01_c01.avi", "Swim/v_Swim_g01_c01.avi"])
    assert result.left_out[FAILED] == 2


def test_missing_list_folder_and_bad_fold_are_clear_errors(tmp_path):
    with pytest.raises(SplitError, match="no such folder"):
        ucf101(tmp_path / "nowhere", 1, [], [])
    with pytest.raises(SplitError, match="fold must be one of 1, 2, 3"):
        hmdb51(tmp_path, 4, [], [])


# --- split files ----------------------------------------------------------------------------------------


def test_split_files_hold_one_sorted_key_per_line_and_read_back(tmp_path):
    write_splits(tmp_path, {"train": ["b/2.avi", "a/1.avi"], "val": ["c/3.avi"], "test": ["a/9.avi"]})
    assert (tmp_path / "train.txt").read_text() == "a/1.avi\nb/2.avi\n"
    assert read_split(tmp_path, "train") == ["a/1.avi", "b/2.avi"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_reading_a_split_that_was_never_written_says_to_run_split(tmp_path):
    with pytest.raises(SplitError, match="run `python -m pipeline split` first"):
        read_split(tmp_path, "val")


def test_reading_an_empty_split_file_is_an_error(tmp_path):
    (tmp_path / "test.txt").write_text("\n")
    with pytest.raises(SplitError, match="test split is empty"):
        read_split(tmp_path, "test")


# --- the stage and the CLI ------------------------------------------------------------------------------


def test_stage_leaves_failed_clips_out_counts_them_and_writes_summary_json(tmp_path):
    cache = make_cache(tmp_path, clips({"jump": 12, "run": 12}),
                       failed=[("jump/broken.avi", "cannot decode"), ("run/empty.avi", "no frames"),
                               ("zoom/", "class folder holds no video files")])
    summary = stage.run(cache, tmp_path / "splits", SplitConfig())
    written = json.loads((tmp_path / "splits" / "summary.json").read_text())
    assert written == summary
    assert summary["left_out"] == {FAILED: 2, NOT_IN_CACHE: 0}
    assert summary["clips"] == {"train": 16, "val": 6, "test": 2, "total": 24}
    assert summary["per_class"]["jump"] == {"train": 8, "val": 3, "test": 1}
    listed = sum((read_split(tmp_path / "splits", n) for n in ("train", "val", "test")), [])
    assert "jump/broken.avi" not in listed and len(listed) == 24


def test_stage_with_official_hmdb51_lists_reports_the_fold(tmp_path):
    cache = make_cache(tmp_path, clips({"jump": 10}))
    folder = write_hmdb51(tmp_path / "lists", {"jump": {f"jump_{i:04d}.avi": 1 + (i >= 7) for i in range(10)}},
                          fold=3)
    summary = stage.run(cache, tmp_path / "splits", SplitConfig(), hmdb51=folder, fold=3)
    assert (summary["mode"], summary["fold"]) == ("hmdb51", 3)
    assert summary["clips"]["test"] == 3 and summary["clips"]["train"] + summary["clips"]["val"] == 7


def test_stage_refuses_both_official_lists_at_once(tmp_path):
    with pytest.raises(SplitError, match="not both"):
        stage.run(tmp_path / "f.h5", tmp_path / "splits", SplitConfig(), hmdb51=tmp_path, ucf101=tmp_path)


def test_cli_split_writes_the_lists_and_prints_a_summary_table(tmp_path):
    cache = make_cache(tmp_path, clips({"jump": 12, "run": 12}))
    done = run_cli("split", str(cache), str(tmp_path / "splits"), "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert "jump" in done.stdout and "total" in done.stdout and "left out" in done.stdout
    assert json.loads((tmp_path / "splits" / "summary.json").read_text())["config"]["seed"] == 1


@pytest.mark.parametrize("extra", [[], ["--hmdb51", "no-such-folder"], ["--test", "0.9"]])
def test_cli_split_on_bad_input_prints_one_line_and_no_traceback(tmp_path, extra):
    cache = tmp_path / "f.h5" if not extra else make_cache(tmp_path, clips({"jump": 12}))
    done = run_cli("split", str(cache), str(tmp_path / "splits"), *extra)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().startswith("error:") and len(done.stderr.strip().splitlines()) == 1
