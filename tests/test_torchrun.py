"""`torchrun --nproc-per-node 2 -m pipeline train ...`: DDP on gloo (CPU), as a user types it.

Two ranks must train what one process trains: the same global batches, the same per-clip dropout masks
(dropout on: the head's defaults, 0.5 and 0.5), the same decisions (early stopping, the non-finite stop) on
every rank, and rank 0 alone writes. The checkpoints then agree to float rounding (the all-reduce adds the
two halves' gradients in another order than one process sums the batch).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import cli_args, outputs_in, read_tsv, resume_state_of, state_of

# Every test that launches torchrun is slow; the dropout masks and the one-line refusal are in the fast set.
TORCHRUN = Path(sys.executable).parent / "torchrun"


def launch(*args: str, ranks: int = 2, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """torchrun as typed (the script beside this interpreter), else `python -m torch.distributed.run`."""
    runner = [str(TORCHRUN)] if TORCHRUN.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    argv = [*runner, "--nproc-per-node", str(ranks), "-m", "pipeline", *args,
            "--params", "/nonexistent/params.yaml"]
    env = {**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def plain(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--params", "/nonexistent/params.yaml"],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_close_states(a: dict, b: dict, atol: float = 2e-4) -> float:
    import torch

    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        worst = max(worst, float((a[key].float() - b[key].float()).abs().max()))
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=atol, msg=key)
    return worst


@pytest.fixture(scope="module")
def one_process(tiny_project, tmp_path_factory):
    """The reference: the same command without torchrun (one process, today's path)."""
    out = tmp_path_factory.mktemp("one")
    # batch 5 over 6 train clips: global batches of 5 and 1, so the ranks' shares are 3+2, then 1+0 (empty)
    result = plain(*cli_args(tiny_project, out, "--epochs", "4", "--batch-size", "5"))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains(tiny_project, one_process, tmp_path):
    result = launch(*cli_args(tiny_project, tmp_path, "--epochs", "4", "--batch-size", "5"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "2 ranks (cpu)" in result.stderr  # rank 0's start line names the world
    assert result.stdout.count("train ->") == 1  # one summary table: rank 0's
    ours, ref = outputs_in(tmp_path), outputs_in(one_process)
    assert_close_states(state_of(ours["model"]), state_of(ref["model"]))
    assert_close_states(resume_state_of(ours["model"])["model"], resume_state_of(ref["model"])["model"])
    got, want = json.loads(ours["metrics"].read_text()), json.loads(ref["metrics"].read_text())
    assert (got["ranks"], want["ranks"]) == (2, 1)
    assert (got["best_epoch"], got["epochs_run"]) == (want["best_epoch"], want["epochs_run"])
    for key in ("val_loss", "train_loss", "val_accuracy", "train_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-4), key
    header, rows = read_tsv(ours["plots"] / "loss.tsv")
    _, ref_rows = read_tsv(ref["plots"] / "loss.tsv")
    np.testing.assert_allclose(np.array(rows), np.array(ref_rows), rtol=1e-3, atol=1e-4)


def test_dropout_masks_follow_the_clip_not_its_batch():
    import torch

    from pipeline.head.dropout import ClipDropout
    from pipeline.head.fit import clip_noise

    drop = ClipDropout(0.5, salt=1).train()
    x = torch.ones(6, 3, 4)
    whole = drop(x, clip_noise(0, 2, np.arange(6)))
    halves = [drop(x[r::2], clip_noise(0, 2, np.arange(6)[r::2])) for r in (0, 1)]
    assert torch.equal(whole[0::2], halves[0]) and torch.equal(whole[1::2], halves[1])
    assert not torch.equal(whole, drop(x, clip_noise(0, 3, np.arange(6))))  # another epoch, other masks
    assert set(whole.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(drop.eval()(x, clip_noise(0, 2, np.arange(6))), x)


@pytest.mark.slow
def test_early_stopping_is_decided_alike_on_every_rank(tiny_project, tmp_path):
    # patience 1 at a huge lr stops after a bad epoch; a rank that went on alone would hang the other
    args = cli_args(tiny_project, tmp_path, "--epochs", "12", "--patience", "1", "--lr", "0.3")
    ref = plain(*cli_args(tiny_project, tmp_path / "one", "--epochs", "12", "--patience", "1", "--lr", "0.3"))
    result = launch(*args, timeout=180)
    assert result.returncode == 0 and ref.returncode == 0, result.stderr[-3000:]
    got = json.loads(outputs_in(tmp_path)["metrics"].read_text())
    want = json.loads(outputs_in(tmp_path / "one")["metrics"].read_text())
    assert got["stopped_early"] and (got["epochs_run"], got["best_epoch"]) == (want["epochs_run"], want["best_epoch"])
    assert got["epochs_run"] < 12


@pytest.mark.slow
def test_a_diverging_run_stops_on_every_rank_with_one_line_each(tiny_project, tmp_path):
    result = launch(*cli_args(tiny_project, tmp_path, "--epochs", "3", "--lr", "1e20"), timeout=180)
    # torchrun itself reports a failed child with its own traceback (ChildFailedError); none comes from ours
    assert result.returncode != 0 and "ChildFailedError" in result.stderr
    assert "pipeline/" not in result.stderr.split("Traceback", 1)[-1] and "stages/" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "training diverged" in line]
    assert len(lines) == 2, result.stderr[-3000:]  # rank 0 plainly, rank 1 naming itself
    assert any(line.startswith("error: training diverged") for line in lines)
    assert any(line.startswith("error: rank 1: training diverged") for line in lines)
    assert not outputs_in(tmp_path)["model"].exists()


@pytest.mark.slow
def test_a_run_cut_short_resumes_under_torchrun(tiny_project, one_process, tmp_path, monkeypatch):
    """One process stops in epoch 3 (Ctrl-C); two ranks finish it: the model is the straight run's."""
    from pipeline.head import fit as fitting
    from tests.cli_helpers import run_in_process

    real_epoch = fitting.train_epoch

    def interrupted(*args, **kwargs):
        if args[5] == 2:  # epoch index 2: the third
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(fitting, "train_epoch", interrupted)
    args = cli_args(tiny_project, tmp_path, "--epochs", "4", "--batch-size", "5")
    assert run_in_process(*args).exit_code == 130
    assert resume_state_of(outputs_in(tmp_path)["model"])["next_epoch"] == 2
    result = launch(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close_states(state_of(outputs_in(tmp_path)["model"]), state_of(outputs_in(one_process)["model"]))
    assert len(read_tsv(outputs_in(tmp_path)["plots"] / "loss.tsv")[1]) == 4


@pytest.mark.slow
def test_a_folder_cache_trains_under_torchrun(tiny_project, tmp_path):
    from pipeline.features.reader import open_cache
    from pipeline.features.shards import ClipFeatures, write_index, write_shard

    folder = tmp_path / "features"
    folder.mkdir()
    with open_cache(tiny_project["cache"]) as cache:  # the same clips, as a folder of two shards + index
        clips = [ClipFeatures(v, cache.classes[cache.labels[i]], cache.features[i], cache.frame_index[i],
                              int(cache.num_frames[i]), float(cache.fps[i]), int(cache.height[i]),
                              int(cache.width[i]), cache.source[i], cache.decoder[i], cache.precision[i])
                 for i, v in enumerate(cache.videos)]
        settings = cache.settings
        attrs = {k: v for k, v in cache.attrs.items() if k not in ("format_version", "classes")}
    write_shard(folder, clips[: len(clips) // 2], [], settings)
    write_shard(folder, clips[len(clips) // 2:], [], settings)
    write_index(folder, attrs)
    project = dict(tiny_project, cache=folder)
    result = launch(*cli_args(project, tmp_path / "run", "--epochs", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(outputs_in(tmp_path / "run")["metrics"].read_text())["ranks"] == 2


def test_world_size_without_torchrun_is_one_line(tiny_project, tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    result = subprocess.run([sys.executable, "-m", "pipeline", *cli_args(tiny_project, tmp_path, "--epochs", "1"),
                             "--params", "/nonexistent/params.yaml"], capture_output=True, text=True, timeout=120,
                            env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "MASTER_ADDR, MASTER_PORT not set: start the run with torchrun" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["pty", "file"])
def test_torchrun_as_typed_with_the_progress_bar_on(tiny_project, tmp_path, where):
    """The bar on (the default), to a terminal and to a file: rank 0 draws it and prints the one table."""
    from tests.project_copy import run_in_pty

    args = [a for a in cli_args(tiny_project, tmp_path, "--epochs", "2") if a != "--no-progress"]
    runner = [str(TORCHRUN)] if TORCHRUN.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    argv = [*runner, "--nproc-per-node", "2", "-m", "pipeline", *args, "--params", "/nonexistent/params.yaml"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if where == "pty":
        status, out, _ = run_in_pty(argv, tmp_path, env, timeout=180)
        text = out.decode(errors="replace")
        assert "━" in text  # a live bar
    else:
        log = tmp_path / "train.log"
        with open(log, "w") as fh:
            status = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env={**env, "COLUMNS": "100"},
                                    timeout=180).returncode
        text = log.read_text()
    assert status == 0, text[-3000:]
    flat = " ".join(text.split())  # rich wraps at the terminal's (or COLUMNS') width
    assert "Traceback" not in text and text.count("train ->") == 1 and "2 ranks (cpu)" in flat
    assert "epoch 2/2" in flat
