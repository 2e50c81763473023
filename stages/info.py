"""`info`: what a feature cache holds and how it was made (provenance, counts per class, failures, size).

The same report for both forms of the cache; the size of a folder cache is all of its files."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.features.cache import size_on_disk
from pipeline.features.reader import open_cache


def run(cache_path: Path, show_failed: int = 20) -> dict:
    """Print the cache's description; return it as a dict (for scripts and tests)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    with open_cache(cache_path) as cache:
        counts = Counter(cache.classes[i] for i in cache.labels)
        described = {
            "path": str(cache_path), "clips": len(cache), "classes": len(cache.classes),
            "failed": len(cache.failed), "feature_shape": list(cache.feature_shape),
            "bytes": size_on_disk(cache_path), "attrs": cache.attrs,
            "per_class": {c: counts.get(c, 0) for c in cache.classes},
        }
        failed = list(cache.failed)

    prov = Table(title=escape(str(cache_path)), show_header=False)
    for key in ("format_version", "backbone", "layer", "weights", "image_size", "frames", "sampling", "dtype",
                "precision", "trunk", "dataset_root", "created", "versions"):
        if key in described["attrs"]:
            prov.add_row(key, escape(str(described["attrs"][key])))
        if key == "precision" and described["attrs"].get("quantization", "none") != "none":
            from pipeline.features.int8 import short  # the record is long: what calibrated it, in one line

            prov.add_row("quantization", escape(short(described["attrs"]["quantization"])))
    prov.add_row("clips", str(described["clips"]))
    prov.add_row("feature shape", " x ".join(map(str, described["feature_shape"])))
    prov.add_row("size", f"{described['bytes'] / 2**20:.1f} MiB")
    console.print(prov)

    per_class = Table(title="clips per class")
    per_class.add_column("class")
    per_class.add_column("clips", justify="right")
    for name, n in described["per_class"].items():
        per_class.add_row(escape(name), str(n))
    console.print(per_class)

    if failed:
        fails = Table(title=f"failed: {len(failed)}")
        fails.add_column("video")
        fails.add_column("reason")
        for video, reason in failed[:show_failed]:
            fails.add_row(escape(video), escape(reason))
        if len(failed) > show_failed:
            fails.add_row(f"... {len(failed) - show_failed} more", "")
        console.print(fails)
    else:
        console.print("failed: none")
    return described
