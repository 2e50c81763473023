"""Stage `render` end to end on a tiny generated project: overlays, strips, GIFs, the offline page, skips."""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import (
    EvaluateConfig,
    ExtractConfig,
    HeadConfig,
    RenderConfig,
    SplitConfig,
    SynthConfig,
    TrainConfig,
)
from pipeline.features.reader import open_cache
from pipeline.head import checkpoint as ck
from pipeline.report import overlay
from pipeline.video.encode import Encoding, numbered_frames, read_frame_number, write_video
from pipeline.video.synthetic import generate_dataset
from stages import evaluate, extract, render, split, train
from tests.cli_helpers import run_cli

CLASSES = ["move_left", "move_right", "move_up"]
NUMBERED = "move_left/numbered.avi"  # frame i shows the number i: proves which frames are drawn
T, H, W = 8, 48, 64


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """synth -> extract -> split -> train -> evaluate, tiny: a 4x4 attention grid over 48x64 frames."""
    root = tmp_path_factory.mktemp("project")
    videos = root / "videos"
    generate_dataset(videos, SynthConfig(seed=0, clips_per_class=4, frames=12, width=W, height=H), classes=CLASSES)
    write_video(videos / NUMBERED, numbered_frames(20, H, W), enc=Encoding("mpeg4", "avi", 2))
    paths = {"videos": videos, "cache": root / "features.h5", "splits": root / "splits",
             "model": root / "head.pt", "metrics": root / "metrics", "plots": root / "plots" / "train"}
    extract.run(videos, paths["cache"], ExtractConfig(weights="random:0", frames=T, image_size=64, layer="conv5_3",
                                                      batch_size=16, workers=2, timeout=30.0), progress=False)
    split.run(paths["cache"], paths["splits"], SplitConfig(seed=0, val=0.25, test=0.5))
    train.run(paths["cache"], paths["splits"], paths["model"], HeadConfig(channels=8),
              TrainConfig(epochs=2, batch_size=4, device="cpu"), metrics_path=paths["metrics"] / "train.json",
              plots_dir=paths["plots"], progress=False)
    evaluate.run(paths["cache"], paths["splits"], paths["model"], paths["metrics"], EvaluateConfig(device="cpu"),
                 plots_dir=root / "plots" / "eval", progress=False)
    return paths


def run_render(project: dict[str, Path], out: Path, **kwargs) -> render.RenderSummary:
    options = dict(splits_dir=project["splits"], metrics_dir=project["metrics"], train_plots=project["plots"],
                   progress=False)
    options.update(kwargs)
    cfg = options.pop("cfg", RenderConfig(per_class=2, strip_frames=4))
    return render.run(project["cache"], project["model"], out, dataclasses.replace(cfg, device="cpu"), **options)


@pytest.fixture(scope="module")
def report(project, tmp_path_factory) -> render.RenderSummary:
    return run_render(project, tmp_path_factory.mktemp("report"))


# --- the overlay itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", [(0, 3), (3, 0), (1, 2)])
def test_blend_puts_the_heat_where_the_attention_is(cell):
    frames = np.full((2, H, W, 3), 128, np.uint8)
    attention = np.zeros((2, 4, 4), np.float32)
    attention[:, cell[0], cell[1]] = 1.0
    out = overlay.blend(frames, attention)
    assert out.shape == frames.shape and out.dtype == np.uint8
    heat = out[0, :, :, 0].astype(int) - out[0, :, :, 2].astype(int)  # red minus blue
    per_cell = heat.reshape(4, H // 4, 4, W // 4).mean(axis=(1, 3))
    assert np.unravel_index(np.argmax(per_cell), per_cell.shape) == cell  # the hottest part of the frame
    cy, cx = (cell[0] + 0.5) * H / 4, (cell[1] + 0.5) * W / 4
    assert heat[int(cy), int(cx)] > 50 and heat[H - 1 - int(cy), W - 1 - int(cx)] < -50
    np.testing.assert_array_equal(overlay.blend(frames, attention, alpha=0.0), frames)


def test_uniform_attention_shows_no_place_and_shapes_are_checked():
    frames = np.random.default_rng(0).integers(0, 255, (3, H, W, 3), dtype=np.uint8)
    flat = overlay.blend(np.zeros_like(frames), np.full((3, 4, 4), 1 / 16, np.float32), alpha=1.0)
    assert (flat == flat[0, 0, 0]).all()  # one colour everywhere
    with pytest.raises(ValueError):
        overlay.blend(frames, np.ones((2, 4, 4)))


def test_safe_names_are_file_names_and_distinct():
    names = ["move_left/clip_003.avi", "a/b c.mp4", "a/b_c.mp4", "../../etc/passwd", "naïve café/ñ.mkv"]
    safe = [overlay.safe_name(n) for n in names]
    assert safe[0] == "move_left__clip_003.avi"
    assert len(set(safe)) == len(safe)
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s) for s in safe)


def test_clip_choice_mixes_right_and_wrong():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    predicted = np.array([0, 0, 1, 1, 1, 1, 1])
    confidence = np.array([0.6, 0.9, 0.8, 0.7, 0.5, 0.6, 0.7])
    keys = [f"k{i}" for i in range(7)]
    picks = render.choose_clips(labels, predicted, confidence, keys, per_class=2)
    assert picks == [1, 2, 5, 6]  # class 0: most confident right + most confidently wrong; class 1: all right
    assert render.choose_clips(labels, predicted, confidence, keys, per_class=0) == []
    assert render.choose_clips(labels, predicted, confidence, keys, per_class=9) == list(range(7))


# --- the stage ------------------------------------------------------------------------------------------


def test_strips_are_two_rows_of_the_picked_frames_and_gifs_have_every_frame(report, project):
    assert len(report.rendered) == len(report.clips) > 0 and not report.skipped
    assert {c.true for c in report.clips} == set(CLASSES)
    picks = overlay.pick_frames(T, 4)
    size, top, bottom = overlay.strip_geometry(len(picks), H, W)
    for clip in report.rendered:
        strip = Image.open(report.out_dir / clip.strip)
        assert strip.format == "PNG" and strip.size == size
        pixels = np.asarray(strip.convert("RGB"))
        upper = pixels[top[0][1]:top[0][3], top[0][0]:top[0][2]].astype(int)
        lower = pixels[bottom[0][1]:bottom[0][3], bottom[0][0]:bottom[0][2]].astype(int)
        assert upper.shape == lower.shape == (H * overlay.display_scale(H), W * overlay.display_scale(H), 3)
        assert np.abs(upper - lower).mean() > 10  # the bottom row is the same frame with heat on it
        gif = Image.open(report.out_dir / clip.animation)
        assert gif.format == "GIF" and gif.n_frames == T and gif.info.get("loop") == 0


def test_overlays_sit_on_the_very_frames_of_frame_index(project, tmp_path):
    summary = run_render(project, tmp_path / "out", clips=[NUMBERED], cfg=RenderConfig(strip_frames=T))
    (clip,) = summary.rendered
    with open_cache(project["cache"]) as cache:
        index = cache.frame_index[cache.indices([NUMBERED])[0]].tolist()
    assert index != list(range(T))  # 8 of 20 frames: a wrong decoder would show other numbers
    picks = overlay.pick_frames(T, T)
    _, top, _ = overlay.strip_geometry(len(picks), H, W)
    pixels = np.asarray(Image.open(summary.out_dir / clip.strip).convert("RGB"))
    s = overlay.display_scale(H)
    shown = [read_frame_number(pixels[y0:y1:s, x0:x1:s]) for x0, y0, x1, y1 in top]
    assert shown == [index[p] for p in picks]


def test_page_is_offline_links_resolve_and_shows_metrics(report, project):
    page = report.index.read_text(encoding="utf-8")
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)['"]""", page, flags=re.I)
    assert refs, "the page shows images"
    for ref in refs:
        assert not re.match(r"(?i)^(https?:)?//|^[a-z]+:", ref), ref
        assert (report.out_dir / ref).is_file(), ref
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert "<script" not in lowered and "@import" not in lowered and "url(" not in lowered
    assert "curves.png" in page and "confusion.png" in page and "deletion.png" in page
    assert "Area between the curves" in page  # the deletion curve's caption states it
    assert Image.open(report.out_dir / "deletion.png").format == "PNG"
    import json

    metrics = json.loads((project["metrics"] / "eval.json").read_text())
    assert "video accuracy" in page and f"{metrics['video_accuracy']:.1%}" in page
    assert f"<b>{metrics['deletion']['area_between']['probability']:.4g}</b>" in page
    assert "pointing accuracy" in page and "uniform" in page  # attention beside its uniform baseline
    assert "random:0 sha256:" in page  # provenance: the weights and their hash
    for clip in report.clips:
        assert clip.key in page
    assert set(p.name for p in (report.out_dir / "clips").iterdir()) == {
        p.name for c in report.clips for p in (c.strip, c.animation)}


def test_missing_or_replaced_video_is_a_recorded_skip(project, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(project["videos"], videos)
    gone, damaged = "move_right/clip_000.avi", "move_up/clip_001.mp4"
    (videos / gone).unlink()
    (videos / damaged).write_text("not a video\n")
    summary = run_render(project, tmp_path / "out", clips=[gone, damaged, NUMBERED], videos=videos)
    skipped = dict(summary.skipped)
    assert set(skipped) == {gone, damaged} and [c.key for c in summary.rendered] == [NUMBERED]
    assert "not found" in skipped[gone] and "changed since it was extracted" in skipped[damaged]
    assert all("\n" not in reason for reason in skipped.values())
    page = summary.index.read_text(encoding="utf-8")
    assert page.count("skipped") >= 2 and gone in page


def test_rerender_leaves_no_stale_files_and_computes_metrics_without_eval_json(project, tmp_path, report):
    out = tmp_path / "out"
    run_render(project, out)
    (out / "clips" / "stray.png").write_bytes(b"old")
    summary = run_render(project, out, clips=[NUMBERED], metrics_dir=tmp_path / "none", train_plots=tmp_path / "none")
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["move_left__numbered.avi.gif",
                                                                  "move_left__numbered.avi.png"]
    assert not (out / "curves.png").exists() and (out / "confusion.png").exists()
    assert not (out / "deletion.png").exists()  # no eval.json: no curve, and the earlier render's is gone
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    page = summary.index.read_text(encoding="utf-8")
    assert "computed by render on split" in page and "no training curves" in page


def test_cli_renders_and_refuses_a_model_from_other_extraction_settings(project, tmp_path):
    base = [str(project["cache"]), "--splits", str(project["splits"]), "--metrics", str(project["metrics"]),
            "--train-plots", str(project["plots"]), "--device", "cpu", "--no-progress"]
    ok = run_cli("render", base[0], str(project["model"]), str(tmp_path / "out"), *base[1:], "--per-class", "1")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "index.html").is_file() and "render ->" in ok.stdout

    ckpt = ck.load(project["model"])
    ckpt.extraction["weights"] = "random:1 sha256:" + "0" * 64
    other = ck.save(tmp_path / "other.pt", ckpt)
    bad = run_cli("render", base[0], str(other), str(tmp_path / "bad"), *base[1:])
    assert bad.returncode == 2
    assert "Traceback" not in bad.stdout + bad.stderr
    assert "extracted differently" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad" / "index.html").exists()


# --- the page's text --------------------------------------------------------------------------------------


HOSTILE = "<script>alert('x')</script>\"&<b>"


def hostile_page(tmp_path: Path) -> str:
    """The page of a report whose clip keys, class names, notes, reasons and provenance all carry markup."""
    from pipeline.report import page
    from pipeline.report.clips import RenderedClip, RenderSummary

    classes = [f"{HOSTILE}class", "plain"]
    ckpt = ck.Checkpoint(state_dict={}, head=HeadConfig(), classes=classes, feature_shape=[8, 512, 7, 7],
                         extraction={"weights": f"{HOSTILE}weights"}, cache={"root": {"a": HOSTILE}},
                         train={"epoch": HOSTILE})
    summary = RenderSummary(tmp_path, tmp_path / "index.html", split=f"{HOSTILE}split", device="cpu",
                            notes=[f"{HOSTILE}note"], metrics_source=f"{HOSTILE}source")
    key = f"{classes[0]}/{HOSTILE}clip.avi"
    summary.clips = [RenderedClip(key, classes[0], "plain", 0.5, False, strip=Path(f"clips/{HOSTILE}.png"),
                                  animation=Path(f"clips/{HOSTILE}.gif")),
                     RenderedClip(f"{HOSTILE}gone.avi", "plain", classes[0], 0.9, False, skipped=f"{HOSTILE}reason")]
    per_class = {classes[0]: {"clips": 1, "accuracy": 0.0}, "plain": {"clips": 1, "accuracy": 1.0}}
    metrics = {"split": f"{HOSTILE}split", "clips": 2, "video_accuracy": 0.5, "per_class": per_class,
               "attention": {"clips_with_boxes": 1, "per_class": {classes[0]: {"clips_with_boxes": 1}}}}
    return page.render_page(summary, metrics, {"note": HOSTILE}, {"confusion": "confusion.png"}, ckpt,
                            {"created": HOSTILE, "dataset_root": HOSTILE, "versions": {"x": HOSTILE}},
                            Path(f"/{HOSTILE}/features.h5"), Path(f"/{HOSTILE}/head.pt"))


def test_markup_in_clip_and_class_names_is_escaped_on_the_page(tmp_path):
    html = hostile_page(tmp_path)
    lowered = html.lower()
    assert "alert(" in html  # it is on the page, as text:
    assert "<script" not in lowered and "<b>split" not in html and "<b>&lt;b&gt;" not in html  # none of theirs
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&#34;&amp;&lt;b&gt;"
    for shown in ("class", "clip.avi", "gone.avi", "reason", "note", "source", "weights", "split"):
        assert escaped + shown in html, shown  # shown, as text
    # attribute values can not be broken out of: image paths URL-quoted, alt texts escaped
    srcs = re.findall(r"""<img src=(["'])(.*?)\1""", html)
    assert [s for _, s in srcs] == ["confusion.png",
                                    "clips/%3Cscript%3Ealert%28%27x%27%29%3C/script%3E%22%26%3Cb%3E.png",
                                    "clips/%3Cscript%3Ealert%28%27x%27%29%3C/script%3E%22%26%3Cb%3E.gif"]
    assert f'alt="frames and attention of {escaped}class/{escaped}clip.avi"' in html
    assert html.count("<img ") == 3 and html.count("<b>") == html.count("</b>")


def test_the_clip_caption_describes_the_fixed_colour_scale(tmp_path):
    html = hostile_page(tmp_path)
    assert "min..max" not in html and "highest" not in html
    low, high = overlay.RATIO_RANGE
    assert f"dark blue at 1/{1 / low:g}x or less" in html and f"dark red at {high:g}x or more" in html
    assert "uniform share (1/49 of the map on this 7x7 grid)" in html and "one fixed log scale" in html
    assert f"matplotlib's {overlay.COLOUR_MAP}" in html and "&ldquo;uniform&rdquo;" in html


def test_the_colour_map_is_matplotlibs():
    import matplotlib

    x = np.linspace(0, 1, 1001, dtype=np.float32)
    expected = matplotlib.colormaps[overlay.COLOUR_MAP](x, bytes=True)[:, :3]
    np.testing.assert_array_equal(overlay.jet(x), expected)
    assert overlay.jet(np.float32(0.0)).tolist() == [0, 0, 127] and overlay.jet(np.float32(1.0)).tolist() == [127, 0, 0]
    np.testing.assert_array_equal(overlay.jet(np.array([-1.0, 2.0])), overlay.jet(np.array([0.0, 1.0])))
