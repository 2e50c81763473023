"""The table the CLI prints after evaluate: the figures that matter beside their baselines, then the notes.

Formatting only (rich, imported lazily): the stage returns eval.json's dict and the CLI prints it here.
(render's table is clips.print_summary, beside the summary it prints, so evaluate does not depend on it.)
"""
from __future__ import annotations

from typing import Any


def _times(ratio: float | None) -> str:
    """" (x0.61)", or nothing when there is no ratio (boxes of zero area: the uniform share is 0)."""
    return "" if ratio is None else f" (x{ratio:.2f})"


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    # the head's label under the table: it grows with the settings, and a title wider than the table wraps
    table = Table(title=f"evaluate on {report['split']} ({report['clips']} clips)",
                  caption=f"head {escape(report['model']['head'])}")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("baseline", justify="right")
    top_key = next(k for k in report if k.startswith("top") and k.endswith("_accuracy"))
    probe = ((report.get("baselines") or {}).get("linear_probe") or {}).get("video_accuracy")
    table.add_row("video accuracy", pct(report["video_accuracy"]), f"{pct(report['chance'])} chance"
                  + (f", {pct(probe)} linear probe" if probe is not None else ""))
    table.add_row("per-frame accuracy", pct(report["frame_accuracy"]), "")
    table.add_row(top_key.replace("_", " "), pct(report[top_key]), "")
    entropy = report["entropy"]
    table.add_row("attention entropy (nats)", "-" if entropy["mean"] is None else f"{entropy['mean']:.3f}",
                  f"{entropy['uniform']:.3f} uniform" + (f", {entropy['motion']:.3f} motion map"
                                                          if entropy.get("motion") is not None else ""))
    att = report["attention"]
    if att["clips_with_boxes"]:
        motion = att.get("mass_in_box_motion") is not None  # the motion-map baseline (absent in older reports)
        table.add_row("attention mass in box", pct(att["mass_in_box"]) + _times(att["mass_ratio"]),
                      f"{pct(att['mass_in_box_uniform'])} uniform, {pct(att.get('mass_in_box_centre'))} centre prior"
                      + _times(att.get("mass_ratio_centre"))
                      + (f", {pct(att['mass_in_box_motion'])} motion map{_times(att.get('mass_ratio_motion'))}"
                         if motion else ""))
        table.add_row("pointing accuracy", pct(att["pointing"]),
                      f"{pct(att['pointing_uniform'])} uniform, {pct(att.get('pointing_centre'))} centre prior"
                      + (f", {pct(att.get('pointing_motion'))} motion map" if motion else ""))
    else:
        table.add_row("attention vs boxes", "no ground-truth boxes", "")
    deletion = report.get("deletion") or {}
    for k, row in deletion.get("k", {}).items():
        rand = row["random"]
        table.add_row(f"true-class p, top-{k} cells deleted", f"{row['top']['true_probability']:.3f}",
                      f"{rand['true_probability']:.3f} ± {rand['true_probability_std']:.3f} random-{k}, "
                      f"{deletion['unmodified']['true_probability']:.3f} none")
    if (deletion.get("area_between") or {}).get("probability") is not None:
        curve, ratios = deletion["curve"], deletion["drop_ratio"]
        ratio = {k: "-" if ratios.get(k) is None else f"x{ratios[k]:.2f}" for k in ("5", "curve")}
        table.add_row(f"deletion curve k {curve['k'][0]}-{curve['k'][-1]} of {curve['cells']}: area (p, top vs random)",
                      f"{deletion['area_between']['probability']:.3f}",
                      f"drop / random drop: {ratio['5']} at k=5, {ratio['curve']} over the curve")
    console = Console()
    console.print(table)
    if att["boxes"] and not att["clips_with_boxes"]:
        console.print(f"  [yellow]note[/] {escape(att['boxes'])} holds no boxes for the {report['clips']} evaluated "
                      "clips", highlight=False)
    elif not att["clips_with_boxes"]:
        looked = ", ".join(att.get("looked_for_boxes") or []) or "nowhere (the cache records no dataset root)"
        console.print(f"  [yellow]note[/] no ground-truth boxes: looked for {escape(looked)}; --boxes FILE points "
                      "elsewhere", highlight=False)
    elif att["clips_with_boxes"] < report["clips"]:
        console.print(f"  [yellow]note[/] boxes for {att['clips_with_boxes']} of {report['clips']} clips only; the "
                      "attention figures are over those", highlight=False)
    if att.get("frames_without_box"):
        none_at_all = f"; {att['clips_without_box']} clips have none at any" if att.get("clips_without_box") else ""
        console.print(f"  [yellow]note[/] {att['frames_without_box']} sampled frames have no box and are not scored "
                      f"({att.get('frames_scored')} are){none_at_all}", highlight=False)
    if att["clips_with_boxes"] and att["mass_ratio"] is None:
        console.print("  [yellow]note[/] the boxes are degenerate (zero area): no mass ratio", highlight=False)
    if probe is not None and report["video_accuracy"] is not None and report["video_accuracy"] < probe:
        console.print(f"  [yellow]note[/] the head is below a linear probe on the clips' mean feature "
                      f"({report['video_accuracy']:.1%} < {probe:.1%}): the appearance decides these classes more "
                      "than the head has learnt; see README \"Below the linear probe\"", highlight=False)
    worst = sorted(((v["accuracy"], k) for k, v in report["per_class"].items() if v["accuracy"] is not None))[:3]
    if worst and worst[0][0] < 1.0:
        console.print("lowest classes: " + escape(", ".join(f"{k} {pct(a)}" for a, k in worst)), highlight=False)
