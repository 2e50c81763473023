"""Stage `train` end to end on a tiny cache: outputs, checkpoint, determinism, resume, early stop, streaming,
refusals."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import HeadConfig, TrainConfig
from pipeline.features.reader import open_cache
from pipeline.head import checkpoint as ck
from pipeline.head import fit as fitting
from pipeline.head import infer as training
from pipeline.head.batches import open_split
from stages import train
from tests.cli_helpers import assert_one_line_error, run_cli, run_in_process

HEAD = HeadConfig(channels=8).for_train_split(2)  # the tiny project: 2 train clips a class, so auto is attended
BASE = dict(epochs=3, batch_size=4, device="cpu")  # 6 train clips: batches of 4 and 2
CLI_BASE = ["--channels", "8", "--batch-size", "4", "--device", "cpu", "--no-progress"]


def tcfg(**changes) -> TrainConfig:
    return TrainConfig(**{**BASE, **changes})


def outputs_in(out: Path) -> dict[str, Path]:
    return {"model": out / "head.pt", "metrics": out / "metrics" / "train.json", "plots": out / "plots"}


def train_into(project: dict[str, Path], out: Path, head: HeadConfig = HEAD, resume: bool = False,
               **changes) -> tuple[train.TrainSummary, dict[str, Path]]:
    paths = outputs_in(out)
    summary = train.run(project["cache"], project["splits"], paths["model"], head, tcfg(**changes),
                        metrics_path=paths["metrics"], plots_dir=paths["plots"], resume=resume, progress=False)
    return summary, paths


def cli_args(project: dict[str, Path], out: Path, *extra: str) -> list[str]:
    paths = outputs_in(out)
    return ["train", str(project["cache"]), str(project["splits"]), str(paths["model"]), "--metrics",
            str(paths["metrics"]), "--plots", str(paths["plots"]), *CLI_BASE, *extra]


def read_tsv(path: Path) -> tuple[list[str], list[list[float]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    return rows[0], [[float(v) for v in row] for row in rows[1:]]


def state_of(model_path: Path) -> dict:
    import torch

    return torch.load(model_path, map_location="cpu", weights_only=True)["state_dict"]


def resume_state_of(model_path: Path) -> dict:
    import torch

    return torch.load(train.resume_path(model_path), map_location="cpu", weights_only=True)


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def val_outputs(project: dict[str, Path], model) -> training.Outputs:
    import torch

    with open_cache(project["cache"]) as cache:
        return training.infer(model, open_split(cache, project["splits"], "val"), 4, torch.device("cpu"))


@pytest.fixture(scope="module")
def reference(tiny_project, tmp_path_factory):
    """Seed 0, 3 epochs, in memory: the run the determinism, resume and streaming tests compare against."""
    summary, paths = train_into(tiny_project, tmp_path_factory.mktemp("reference"))
    return summary, paths


@pytest.fixture(scope="module")
def cli_run(tiny_project, tmp_path_factory):
    """`python -m pipeline train ... --epochs 2` in a real process."""
    out = tmp_path_factory.mktemp("cli")
    result = run_cli(*cli_args(tiny_project, out, "--epochs", "2"))
    return result, outputs_in(out)


# --- the CLI's outputs ----------------------------------------------------------------------------------


def test_cli_writes_checkpoint_metrics_and_one_curve_row_per_epoch(cli_run):
    from pipeline.head.model import build_head

    result, paths = cli_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    parameters = sum(p.numel() for p in build_head(HEAD, 512, 3).parameters())
    assert f"{parameters:,} parameters" in result.stderr  # the start line names the size of the head
    assert "6 train / 3 val clips (in memory)" in result.stderr
    assert "train ->" in result.stdout  # the summary table

    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["epochs_run"] == 2 and metrics["stopped_early"] is False
    assert metrics["parameters"] == parameters
    assert (metrics["train_clips"], metrics["val_clips"]) == (6, 3)
    assert "seconds_per_epoch" not in metrics and "device" not in metrics  # they change from run to run
    timings = json.loads(train.timings_path(paths["model"]).read_text())
    assert timings["device"] == "cpu" and timings["seconds_per_epoch"] > 0 and len(timings["epochs"]) == 2

    for name in ("loss", "accuracy"):
        assert paths["plots"].joinpath(f"{name}.tsv").read_text().splitlines()[0] == "epoch\ttrain\tval"
    header, loss = read_tsv(paths["plots"] / "loss.tsv")
    _, accuracy = read_tsv(paths["plots"] / "accuracy.tsv")
    assert [row[0] for row in loss] == [row[0] for row in accuracy] == [1, 2]
    assert all(math.isfinite(v) and v > 0 for row in loss for v in row[1:])
    # accuracies are clip counts (sixths on train, thirds on val), written with 6 significant digits
    assert all(abs(row[1] * 6 - round(row[1] * 6)) < 1e-4 and abs(row[2] * 3 - round(row[2] * 3)) < 1e-4
               for row in accuracy)
    # the selected epoch is the one with the lowest val loss, and the metrics are that epoch's
    val_losses = [row[2] for row in loss]
    best = int(np.argmin(val_losses))
    assert metrics["best_epoch"] == best + 1
    assert metrics["val_loss"] == pytest.approx(val_losses[best], abs=1e-5)  # TSV: 6 significant digits
    assert metrics["train_loss"] == pytest.approx(loss[best][1], abs=1e-5)
    assert metrics["val_accuracy"] == pytest.approx(accuracy[best][2], abs=1e-5)
    assert metrics["train_accuracy"] == pytest.approx(accuracy[best][1], abs=1e-5)
    assert train.resume_path(paths["model"]).is_file()


def test_checkpoint_loads_weights_only_with_config_classes_shape_and_provenance(cli_run, tiny_project):
    import torch

    _, paths = cli_run
    payload = torch.load(paths["model"], map_location="cpu", weights_only=True)
    assert set(payload) == {"format", "format_version", "state_dict", "head", "classes", "feature_shape",
                            "extraction", "cache", "train"}
    assert (payload["format"], payload["format_version"]) == ("videoattn-head", 1)
    assert payload["head"] == dataclasses.asdict(HEAD)
    assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())
    with open_cache(tiny_project["cache"]) as cache:
        assert payload["classes"] == cache.classes == ["move_left", "move_right", "move_up"]
        assert payload["feature_shape"] == list(cache.feature_shape) == [6, 512, 4, 4]
        assert payload["extraction"]["weights"] == cache.attrs["weights"]
        assert payload["cache"].get("created") == cache.attrs.get("created")  # none: no wall-clock time
    assert re.fullmatch(r"random:0 sha256:[0-9a-f]{64}", payload["extraction"]["weights"])
    assert (payload["extraction"]["frames"], payload["extraction"]["image_size"],
            payload["extraction"]["layer"], payload["extraction"]["backbone"]) == (6, 64, "conv5_3", "vgg16")
    assert payload["cache"]["path"] == str(tiny_project["cache"])
    assert payload["cache"]["dataset_root"] == "videos"  # relative to the cache's folder, as the cache records it
    assert {"torch", "pipeline"} <= set(payload["cache"]["versions"])
    metrics = json.loads(paths["metrics"].read_text())
    assert payload["train"]["epoch"] == metrics["best_epoch"]
    assert round(payload["train"]["val_loss"], 6) == metrics["val_loss"]
    assert (payload["train"]["epochs"], payload["train"]["seed"], payload["train"]["train_clips"]) == (2, 0, 6)


def test_built_checkpoint_is_the_trained_model(tiny_project, tmp_path):
    """One epoch (so the saved epoch is the last): Checkpoint.build() answers exactly as the live model did."""
    import torch

    from pipeline.head.model import build_head

    summary, paths = train_into(tiny_project, tmp_path, epochs=1)
    ckpt = ck.load(paths["model"])
    built = ckpt.build()
    assert not built.training
    live = build_head(HEAD, 512, 3)
    live.load_state_dict(resume_state_of(paths["model"])["model"])  # the model after the last epoch
    a, b = val_outputs(tiny_project, built), val_outputs(tiny_project, live)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.attention, b.attention)
    # and the loss the stage measured for that epoch is the built model's loss on val
    assert training.loss_of(a, tcfg().attention_reg) == ckpt.train["val_loss"] == summary.history[0].val_loss
    assert training.accuracies(a)[0] == ckpt.train["val_accuracy"]
    with torch.inference_mode():
        x = torch.zeros(1, 6, 512, 4, 4)
        assert torch.equal(built(x).logits, live.eval()(x).logits)


# --- determinism, resume ----------------------------------------------------------------------------------


def test_same_seed_is_bit_identical_and_another_seed_differs(tiny_project, reference, tmp_path):
    _, ref = reference
    _, again = train_into(tiny_project, tmp_path / "again")
    assert same_tensors(state_of(ref["model"]), state_of(again["model"]))
    assert same_tensors(resume_state_of(ref["model"])["model"], resume_state_of(again["model"])["model"])
    for name in ("loss.tsv", "accuracy.tsv"):
        assert (ref["plots"] / name).read_bytes() == (again["plots"] / name).read_bytes()
    assert ref["metrics"].read_bytes() == again["metrics"].read_bytes()  # no timings: git stays clean on a rerun

    _, other = train_into(tiny_project, tmp_path / "seed1", seed=1)
    assert not same_tensors(resume_state_of(ref["model"])["model"], resume_state_of(other["model"])["model"])
    assert (ref["plots"] / "loss.tsv").read_bytes() != (other["plots"] / "loss.tsv").read_bytes()


def test_resume_after_an_interruption_equals_training_straight_through(tiny_project, reference, tmp_path,
                                                                       monkeypatch):
    _, ref = reference
    real_epoch = fitting.train_epoch

    def interrupted(model, clips, optimiser, cfg, device, epoch, on_batch=None, **kwargs):
        if epoch == 2:  # the third epoch: as if Ctrl-C arrived during it
            raise KeyboardInterrupt
        return real_epoch(model, clips, optimiser, cfg, device, epoch, on_batch, **kwargs)

    monkeypatch.setattr(fitting, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_into(tiny_project, tmp_path)
    paths = outputs_in(tmp_path)
    assert resume_state_of(paths["model"])["next_epoch"] == 2
    assert len(read_tsv(paths["plots"] / "loss.tsv")[1]) == 2
    monkeypatch.setattr(fitting, "train_epoch", real_epoch)

    result = run_in_process(*cli_args(tiny_project, tmp_path, "--epochs", "3", "--resume"))
    assert result.exit_code == 0, result.output
    assert same_tensors(state_of(paths["model"]), state_of(ref["model"]))
    assert same_tensors(resume_state_of(paths["model"])["model"], resume_state_of(ref["model"])["model"])
    for name in ("loss.tsv", "accuracy.tsv"):
        assert (paths["plots"] / name).read_bytes() == (ref["plots"] / name).read_bytes()
    assert paths["metrics"].read_bytes() == ref["metrics"].read_bytes()


def test_resuming_a_finished_run_trains_nothing_more(tiny_project, reference, tmp_path):
    _, ref = reference
    out = tmp_path / "copy"
    shutil.copytree(ref["model"].parent, out)
    paths = outputs_in(out)
    before = paths["model"].read_bytes()
    summary, _ = train_into(tiny_project, out, resume=True)
    assert summary.resumed_from == 3 and len(summary.history) == 3 and not summary.stopped_early
    assert paths["model"].read_bytes() == before
    assert (paths["plots"] / "loss.tsv").read_bytes() == (ref["plots"] / "loss.tsv").read_bytes()
    assert paths["metrics"].read_bytes() == ref["metrics"].read_bytes()


@pytest.mark.parametrize("change, fragment", [
    (["--channels", "16"], "other head/train settings"),
    (["--lr", "0.01"], "other head/train settings"),
    (["--cell", "lstm"], "other head/train settings"),
])
def test_resume_with_other_settings_is_refused_and_keeps_the_run(tiny_project, reference, tmp_path, change, fragment):
    _, ref = reference
    shutil.copytree(ref["model"].parent, tmp_path / "run")
    paths = outputs_in(tmp_path / "run")
    before = {p: p.read_bytes() for p in (paths["model"], train.resume_path(paths["model"]), paths["metrics"])}
    result = run_in_process(*cli_args(tiny_project, tmp_path / "run", "--epochs", "3", "--resume", *change))
    assert_one_line_error(result, fragment, "--resume")
    assert {p: p.read_bytes() for p in before} == before  # nothing already computed is lost


def test_a_state_file_from_before_a_setting_existed_resumes_and_one_set_otherwise_is_refused(tiny_project, reference,
                                                                                              tmp_path):
    """Settings added since a state file was written (absent from its identity) count as what they were before
    they existed; set otherwise on either side, they are a difference."""
    import torch

    _, ref = reference
    shutil.copytree(ref["model"].parent, tmp_path / "run")
    state_path = train.resume_path(outputs_in(tmp_path / "run")["model"])
    payload = torch.load(state_path, weights_only=True)
    for name in ("jitter", "ema_epochs"):  # added after the first resumable runs
        del payload["identity"]["train"][name]
    for name in ("heads",):  # appearance is not: the tiny split resolves auto to attended, not the old none
        del payload["identity"]["head"][name]
    torch.save(payload, state_path)
    result = run_in_process(*cli_args(tiny_project, tmp_path / "run", "--epochs", "3", "--resume"))
    assert result.exit_code == 0, result.output  # the run had finished: it resumes and has nothing left to do
    assert same_tensors(state_of(outputs_in(tmp_path / "run")["model"]), state_of(ref["model"]))

    identity = resume_state_of(ref["model"])["identity"]  # today's, every key present
    assert fitting.same_identity(payload["identity"], identity)  # the missing keys count as their old values
    assert not fitting.same_identity(payload["identity"], {**identity, "train": {**identity["train"], "jitter": 0.2}})
    assert not fitting.same_identity({**identity, "train": {**identity["train"], "jitter": 0.2}}, identity)
    assert not fitting.same_identity(identity, {**identity, "frames": 7})
    # a key from before: a file without `readout` was trained with the mean readout, not today's default
    old = {**payload["identity"], "head": {k: v for k, v in identity["head"].items() if k != "readout"}}
    assert not fitting.same_identity(old, identity)
    assert fitting.same_identity(old, {**identity, "head": {**identity["head"], "readout": "mean"}})


def test_resume_without_or_with_a_broken_state_file_is_refused(tiny_project, tmp_path):
    result = run_in_process(*cli_args(tiny_project, tmp_path, "--epochs", "3", "--resume"))
    assert_one_line_error(result, "no training state to resume from")
    assert not outputs_in(tmp_path)["model"].exists()
    state = train.resume_path(outputs_in(tmp_path)["model"])
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(os.urandom(300))
    assert_one_line_error(run_in_process(*cli_args(tiny_project, tmp_path, "--epochs", "3", "--resume")),
                          "not a readable training state")


# --- early stopping, streaming, cells ---------------------------------------------------------------------


def test_early_stopping_keeps_the_best_val_epoch(tiny_project, tmp_path):
    """lr 1.0 makes the val loss climb after the first epoch; patience 1 stops the run one epoch later."""
    summary, paths = train_into(tiny_project, tmp_path, epochs=6, lr=1.0, patience=1)
    metrics = json.loads(paths["metrics"].read_text())
    _, loss = read_tsv(paths["plots"] / "loss.tsv")
    val = [row[2] for row in loss]
    assert metrics["stopped_early"] is True and summary.stopped_early
    assert metrics["epochs_run"] == len(loss) < 6
    assert metrics["best_epoch"] == int(np.argmin(val)) + 1
    assert metrics["epochs_run"] == metrics["best_epoch"] + 1  # patience 1: one epoch without improvement
    assert metrics["val_loss"] == pytest.approx(min(val), rel=1e-5) and val[-1] > min(val)
    ckpt = ck.load(paths["model"])
    assert ckpt.train["epoch"] == metrics["best_epoch"]
    # the saved weights are the best epoch's, not the last one's
    outputs = val_outputs(tiny_project, ckpt.build())
    assert training.loss_of(outputs, ckpt.train["attention_reg"]) == ckpt.train["val_loss"]
    assert ckpt.train["val_loss"] == pytest.approx(min(val), rel=1e-5) == min(e.val_loss for e in summary.history)
    assert resume_state_of(paths["model"])["next_epoch"] == metrics["epochs_run"]


# 2: data-loader processes with their own handles (slow; fast form: the streamed-split test below); 0: a thread
@pytest.mark.parametrize("loader_workers", [pytest.param(2, marks=pytest.mark.slow), 0])
def test_streaming_from_the_file_trains_the_same_model_as_in_memory(tiny_project, reference, tmp_path,
                                                                    loader_workers):
    _, ref = reference
    summary, paths = train_into(tiny_project, tmp_path, max_memory_gb=0.0, loader_workers=loader_workers)
    assert summary.in_memory is False
    assert same_tensors(state_of(paths["model"]), state_of(ref["model"]))
    assert same_tensors(resume_state_of(paths["model"])["model"], resume_state_of(ref["model"])["model"])
    assert (paths["plots"] / "loss.tsv").read_bytes() == (ref["plots"] / "loss.tsv").read_bytes()
    assert (paths["plots"] / "accuracy.tsv").read_bytes() == (ref["plots"] / "accuracy.tsv").read_bytes()


@pytest.mark.parametrize("cell, attention", [("convlstm", "none"), ("lstm", "soft"), ("lstm", "none"),
                                             ("mean", "soft")])
def test_every_cell_and_attention_trains_through_the_cli(tiny_project, tmp_path, cell, attention):
    from pipeline.head.model import build_head

    result = run_in_process(*cli_args(tiny_project, tmp_path, "--epochs", "1", "--cell", cell,
                                      "--attention", attention))
    assert result.exit_code == 0, result.output
    head = HeadConfig(cell=cell, attention=attention, channels=8).for_train_split(2)  # as train resolves it
    parameters = sum(p.numel() for p in build_head(head, 512, 3).parameters())
    assert f"train {head.label} head, {parameters:,} parameters" in result.stderr
    paths = outputs_in(tmp_path)
    ckpt = ck.load(paths["model"])
    assert (ckpt.head.cell, ckpt.head.attention) == (cell, attention)
    assert json.loads(paths["metrics"].read_text())["parameters"] == parameters
    out = val_outputs(tiny_project, ckpt.build())
    assert out.logits.shape == (3, 6, 3) and np.isfinite(out.logits).all()
    np.testing.assert_allclose(out.attention.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    if attention == "none" or cell == "mean":  # uniform attention: 1/16 on every cell of the 4x4 grid
        np.testing.assert_allclose(out.attention, 1 / 16, rtol=1e-6)


# --- refusals -------------------------------------------------------------------------------------------


def splits_with(tmp_path: Path, project: dict[str, Path], **files: str | None) -> Path:
    """A copy of the project's split lists with some replaced (text) or removed (None)."""
    out = tmp_path / "splits"
    shutil.copytree(project["splits"], out)
    for name, text in files.items():
        if text is None:
            (out / f"{name}.txt").unlink()
        else:
            (out / f"{name}.txt").write_text(text)
    return out


@pytest.mark.parametrize("case", ["no val file", "empty val file", "unknown clip", "unknown class", "no cache",
                                  "not a cache", "unknown cell", "unknown attention", "unknown schedule",
                                  "zero epochs", "even kernel"])
def test_bad_input_is_one_line_and_exit_2(tiny_project, tmp_path, case):
    cache, splits, extra = tiny_project["cache"], tiny_project["splits"], []
    train_list = (tiny_project["splits"] / "train.txt").read_text()
    if case == "no val file":
        splits, fragments = splits_with(tmp_path, tiny_project, val=None), ["val.txt", "no such split file"]
    elif case == "empty val file":
        splits, fragments = splits_with(tmp_path, tiny_project, val="\n\n"), ["val.txt", "empty"]
    elif case == "unknown clip":
        splits = splits_with(tmp_path, tiny_project, train=train_list + "move_left/clip_999.avi\n")
        fragments = ["train.txt", "not in", "move_left/clip_999.avi"]
    elif case == "unknown class":
        splits = splits_with(tmp_path, tiny_project, train="dance/clip_000.avi\n" + train_list)
        fragments = ["train.txt", "dance/clip_000.avi"]
    elif case == "no cache":
        cache, fragments = tmp_path / "missing.h5", ["missing.h5", "no such cache"]
    elif case == "not a cache":
        cache = tmp_path / "text.h5"
        cache.write_text("not hdf5\n")
        fragments = ["text.h5", "not an HDF5 file"]
    elif case == "unknown cell":
        extra, fragments = ["--cell", "gru"], ["head.cell", "gru"]
    elif case == "unknown attention":
        extra, fragments = ["--attention", "hard"], ["head.attention", "hard"]
    elif case == "unknown schedule":
        extra, fragments = ["--schedule", "linear"], ["train.schedule", "linear"]
    elif case == "zero epochs":
        extra, fragments = ["--epochs", "0"], ["epochs"]
    else:
        extra, fragments = ["--kernel", "2"], ["head.kernel"]
    model = tmp_path / "out" / "head.pt"
    result = run_in_process("train", str(cache), str(splits), str(model), "--metrics", str(tmp_path / "m.json"),
                            "--plots", str(tmp_path / "plots"), *CLI_BASE, "--epochs", "1", *extra)
    assert_one_line_error(result, *fragments)
    assert not model.exists() and not (tmp_path / "m.json").exists()


def test_bad_input_in_a_real_process_has_no_traceback(tiny_project, tmp_path):
    splits = splits_with(tmp_path, tiny_project, val=None)
    result = run_cli("train", str(tiny_project["cache"]), str(splits), str(tmp_path / "head.pt"),
                     "--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "p"), *CLI_BASE)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"error: {splits / 'val.txt'}: no such split file; run `python -m pipeline split` first"]


@pytest.mark.parametrize("where", ["model", "metrics"])
def test_an_unwritable_output_path_is_one_line_and_exit_2(tiny_project, tmp_path, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be\n")
    paths = outputs_in(tmp_path)
    model = blocker / "head.pt" if where == "model" else paths["model"]
    metrics = blocker / "train.json" if where == "metrics" else paths["metrics"]
    result = run_in_process("train", str(tiny_project["cache"]), str(tiny_project["splits"]), str(model),
                            "--metrics", str(metrics), "--plots", str(paths["plots"]), *CLI_BASE, "--epochs", "1")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exception, result.output)
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and "a_file" in last and "Traceback" not in result.output


def test_a_diverging_run_fails_instead_of_leaving_a_stale_model(tiny_project, reference, tmp_path):
    _, ref = reference
    shutil.copytree(ref["model"].parent, tmp_path / "run")  # a model from an earlier run is already there
    paths = outputs_in(tmp_path / "run")
    train.resume_path(paths["model"]).unlink()
    before = {p: p.read_bytes() for p in (paths["model"], paths["metrics"], paths["plots"] / "loss.tsv")}
    result = run_in_process(*cli_args(tiny_project, tmp_path / "run", "--epochs", "2", "--lr", "1e20"))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert "error: " in result.stderr and "Traceback" not in result.output
    assert "training diverged: the loss is NaN at epoch 1" in result.stderr and "lower --lr" in result.stderr
    # the failed run wrote nothing: the earlier run's model and the metrics that describe it stay a pair
    assert {p: p.read_bytes() for p in before} == before
    assert not train.resume_path(paths["model"]).exists()


def test_a_run_that_diverges_later_keeps_its_best_epoch_and_stops(tiny_project, tmp_path, monkeypatch):
    real_epoch = fitting.train_epoch

    def diverging(model, clips, optimiser, cfg, device, epoch, on_batch=None, **kwargs):
        result = real_epoch(model, clips, optimiser, cfg, device, epoch, on_batch, **kwargs)
        return dataclasses.replace(result, loss=math.nan) if epoch == 1 else result  # the second epoch

    monkeypatch.setattr(fitting, "train_epoch", diverging)
    result = run_in_process(*cli_args(tiny_project, tmp_path, "--epochs", "3"))
    assert result.exit_code == 0, result.output
    assert "training diverged: the loss is NaN at epoch 2" in result.stderr and "kept epoch 1" in result.stderr
    paths = outputs_in(tmp_path)
    metrics = json.loads(paths["metrics"].read_text())
    assert (metrics["best_epoch"], metrics["epochs_run"]) == (1, 1)  # the NaN epoch is not recorded
    assert ck.load(paths["model"]).train["epoch"] == 1
    assert len(read_tsv(paths["plots"] / "loss.tsv")[1]) == 1
    assert resume_state_of(paths["model"])["next_epoch"] == 1


@pytest.mark.parametrize("where", ["cache", "model"])
def test_paths_with_square_brackets_are_printed_verbatim(tiny_project, tmp_path, where):
    odd = tmp_path / "runs[/x]"
    cache = odd / "missing.h5" if where == "cache" else tiny_project["cache"]
    model = odd / "head.pt" if where == "model" else tmp_path / "head.pt"
    result = run_in_process("train", str(cache), str(tiny_project["splits"]), str(model), "--metrics",
                            str(tmp_path / "m.json"), "--plots", str(tmp_path / "plots"), *CLI_BASE, "--epochs", "1")
    if where == "cache":
        assert_one_line_error(result, str(cache))
    else:
        assert result.exit_code == 0 and str(model) in result.stdout, (result.exception, result.output)


def test_a_streamed_split_is_read_by_loader_processes_with_their_own_handles(tiny_project):
    with open_cache(tiny_project["cache"]) as cache:
        clips = open_split(cache, tiny_project["splits"], "train", max_memory_gb=0.0, loader_workers=2)
        want = cache.load(clips.index)
        for _ in range(2):  # two passes (epochs) through the same persistent workers, in a new order each
            order = np.random.default_rng(_).permutation(len(clips))
            got = {int(r): f.numpy() for b in clips.batches(4, order) for r, f in zip(b.rows, b.features)}
            assert sorted(got) == list(range(len(clips)))
            for r, f in got.items():
                np.testing.assert_array_equal(f, want[r])
        loader, _passes = clips._loader
        assert loader.num_workers == 2 and loader.dataset._cache is None  # this process never read through it
