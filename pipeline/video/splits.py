"""Train/val/test splits of a feature cache: seeded stratified, or the official HMDB-51 / UCF-101 lists.

A split is three lists of video keys (`<class>/<clip>.avi`, as the cache stores them). The stratified split
places every clip by a hash of (seed, key), so it is the same on every machine and adding clips to a
dataset moves only a few existing ones. The official lists are read as published; a validation set is
carved from their train part the same stratified way. Clips a list names that the cache cannot supply
(failed extraction, never extracted) are left out and counted, never silently dropped.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Iterable, Sequence

from pipeline.errors import UserError
from pipeline.files import write_text_atomic

SPLIT_NAMES = ("train", "val", "test")
FOLDS = (1, 2, 3)  # both HMDB-51 and UCF-101 publish three

# Why a clip is not in any split (keys of `SplitResult.left_out`).
FAILED = "failed extraction"
NOT_IN_CACHE = "not in cache"
UNUSED = "marked unused (0)"  # HMDB-51 lists mark some clips 0 for a fold: by design, not a loss
UNLISTED = "in cache, not in the lists"


class SplitError(UserError):
    """A split that cannot be made or read as asked; the message says what to do."""


@dataclass
class SplitResult:
    """Three lists of keys, and how many clips were left out of them, by reason."""

    splits: dict[str, list[str]]
    left_out: dict[str, int] = field(default_factory=dict)


def class_of(key: str) -> str:
    """The class folder of a video key: "brush_hair/a.avi" -> "brush_hair"."""
    return key.split("/", 1)[0]


def _few(names: Sequence[str], shown: int = 5) -> str:
    """"a, b, c" or "a, b, c, ... (12 in all)" for one-line messages."""
    head = ", ".join(names[:shown])
    return head if len(names) <= shown else f"{head}, ... ({len(names)} in all)"


# --- stratified --------------------------------------------------------------------------------------


def _check_ratios(val: float, test: float) -> None:
    for name, ratio in (("val", val), ("test", test)):
        if not 0 <= ratio < 1:
            raise SplitError(f"{name} ratio must be in [0, 1), got {ratio}")
    if val + test >= 1:
        raise SplitError(f"val + test must leave clips for train (< 1), got {val} + {test} = {val + test:g}")


def _hash_order(keys: Iterable[str], seed: int) -> list[str]:
    """Keys in the order of sha256(f"{seed}:{key}"): fixed per key, so new keys interleave, old ones keep order."""
    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).digest())


def _part_sizes(n: int, ratios: Sequence[float]) -> list[int]:
    """How many of a class's `n` clips go to each held-out part; the rest (at least one) stays in train.

    round(ratio * n), raised to one for every positive ratio when the class has a clip to spare for each.
    """
    sizes = [math.floor(r * n + 0.5) for r in ratios]
    positive = [r > 0 for r in ratios]
    if n >= 1 + sum(positive):
        sizes = [max(s, 1) if p else s for s, p in zip(sizes, positive)]
    while n > 0 and sum(sizes) > n - 1:  # keep one clip for train: shrink the largest part
        sizes[sizes.index(max(sizes))] -= 1
    return sizes


def _stratify(videos: Sequence[str], labels: Sequence[Hashable], val: float, test: float,
              seed: int) -> dict[str, list[str]]:
    """Per class: hash order, the first clips to test, the next to val, the rest to train (lists sorted)."""
    if len(videos) != len(labels):
        raise ValueError(f"{len(videos)} videos but {len(labels)} labels")
    by_class: dict[Hashable, list[str]] = defaultdict(list)
    for video, label in zip(videos, labels):
        by_class[label].append(video)
    out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for clips in by_class.values():
        order = _hash_order(clips, seed)
        n_test, n_val = _part_sizes(len(order), (test, val))
        out["test"] += order[:n_test]
        out["val"] += order[n_test:n_test + n_val]
        out["train"] += order[n_test + n_val:]
    return {name: sorted(keys) for name, keys in out.items()}


def _require_nonempty(splits: dict[str, list[str]], why: str) -> None:
    empty = [name for name in SPLIT_NAMES if not splits.get(name)]
    if empty:
        raise SplitError(f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty: {why}")


def stratified(videos: Sequence[str], labels: Sequence[Hashable], val: float, test: float,
               seed: int) -> dict[str, list[str]]:
    """Seeded per-class train/val/test split by ratio, stable when clips are added.

    Every class with >= 3 clips gets at least one val and one test clip (when both ratios are > 0).
    """
    _check_ratios(val, test)
    splits = _stratify(videos, labels, val, test, seed)
    n_classes = len(set(labels))
    zero = [name for name, r in (("val", val), ("test", test)) if r == 0]
    why = (f"{' and '.join(zero)} ratio is 0; train and evaluate need all three splits" if zero else
           f"{len(videos)} clips in {n_classes} classes are too few for val={val}, test={test} "
           "(a class needs at least 3 clips to give one to each split)")
    _require_nonempty(splits, why)
    return splits


# --- official lists ----------------------------------------------------------------------------------


class _Keys:
    """Looks up list entries among the cache's keys and failures; class names and keys case-insensitively."""

    def __init__(self, videos: Sequence[str], classes: Sequence[str], failed: Iterable[str]):
        self.videos = set(videos)
        self._fold = {v.casefold(): v for v in sorted(videos, reverse=True)}  # first key wins on a clash
        self.failed = {f.casefold() for f in failed}
        self.classes = {c.casefold() for c in classes} | {class_of(f) for f in self.failed}

    def find(self, key: str) -> str | None:
        return key if key in self.videos else self._fold.get(key.casefold())

    def is_failed(self, key: str) -> bool:
        return key.casefold() in self.failed

    def knows_class(self, name: str) -> bool:
        return name.casefold() in self.classes


def _check_folder(folder: Path, fold: int, what: str) -> None:
    if fold not in FOLDS:
        raise SplitError(f"fold must be one of {', '.join(map(str, FOLDS))}, got {fold}")
    if not folder.is_dir():
        raise SplitError(f"{folder}: no such folder (expected the official {what})")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped line) for every non-blank line of a list file."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SplitError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _assign(entries: Iterable[tuple[str, str]], keys: _Keys, listed_in: str) -> tuple[dict[str, list[str]], Counter]:
    """(key as listed, split name) -> keys per split name; entries the cache lacks are counted by reason."""
    chosen: dict[str, list[str]] = defaultdict(list)
    left_out: Counter = Counter({FAILED: 0, NOT_IN_CACHE: 0})
    unknown: list[str] = []
    for listed, name in entries:
        found = keys.find(listed)
        if found is not None:
            chosen[name].append(found)
        elif keys.is_failed(listed):
            left_out[FAILED] += 1
        elif keys.knows_class(class_of(listed)):
            left_out[NOT_IN_CACHE] += 1
        elif class_of(listed) not in unknown:
            unknown.append(class_of(listed))
    if unknown:
        raise SplitError(f"{listed_in} names {len(unknown)} class(es) the cache does not hold: {_few(unknown)}; "
                         "is it the list of another dataset, or were these classes not extracted?")
    return chosen, left_out


def _finish(train: list[str], test: list[str], videos: Sequence[str], left_out: Counter, val: float, seed: int,
            empty_why: str) -> SplitResult:
    """Carve val from train (stratified, seeded), count cache clips no list mentions, check nothing is empty."""
    if not 0 <= val < 1:
        raise SplitError(f"val ratio must be in [0, 1), got {val}")
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise SplitError(f"{len(overlap)} clip(s) are listed for both train and test: {_few(overlap)}")
    carved = _stratify(train, [class_of(k) for k in train], val, 0.0, seed)
    splits = {"train": carved["train"], "val": carved["val"], "test": sorted(set(test))}
    left_out[UNLISTED] = len(set(videos) - set(train) - set(test))
    _require_nonempty(splits, f"{empty_why} ({left_out[FAILED]} failed extraction, "
                              f"{left_out[NOT_IN_CACHE]} not in cache; val={val} of train)")
    return SplitResult(splits, dict(left_out))


def hmdb51(folder: str | Path, fold: int, videos: Sequence[str], classes: Sequence[str], *,
           failed: Iterable[str] = (), val: float = 0.21, seed: int = 0) -> SplitResult:
    """The official HMDB-51 split `fold`: files `<class>_test_split<fold>.txt`, lines `<clip>.avi <0|1|2>`.

    1 = train, 2 = test, 0 = not used in this fold. Val is carved from train.
    """
    folder = Path(folder)
    _check_folder(folder, fold, f"HMDB-51 split files <class>_test_split{fold}.txt")
    keys = _Keys(videos, classes, failed)
    pattern = re.compile(rf"^(.+)_test_split{fold}\.txt$")
    files = {m.group(1).casefold(): (m.group(1), p) for p in sorted(folder.iterdir())
             if (m := pattern.match(p.name)) and p.is_file()}
    missing = [folder / f"{c}_test_split{fold}.txt" for c in classes if c.casefold() not in files]
    if missing:
        more = f" (and {len(missing) - 1} more class files)" if len(missing) > 1 else ""
        raise SplitError(f"{missing[0]}: no such split file{more}; --hmdb51 must be the folder of the official "
                         "testTrainMulti_7030_splits files")
    marks = {"1": "train", "2": "test", "0": None}
    entries: list[tuple[str, str]] = []
    unused = 0
    for cls, path in files.values():
        for lineno, line in _read_lines(path):
            fields = line.split()
            if len(fields) != 2 or fields[1] not in marks:
                raise SplitError(f"{path}:{lineno}: expected '<clip>.avi <0|1|2>', got {line!r}")
            if marks[fields[1]] is None:
                unused += 1
            else:
                entries.append((f"{cls}/{fields[0]}", marks[fields[1]]))
    chosen, left_out = _assign(entries, keys, f"{folder} (fold {fold})")
    left_out[UNUSED] = unused
    return _finish(chosen["train"], chosen["test"], videos, left_out, val, seed,
                   f"none of the clips HMDB-51 fold {fold} lists for it is in the cache")


def ucf101(folder: str | Path, fold: int, videos: Sequence[str], classes: Sequence[str], *,
           failed: Iterable[str] = (), val: float = 0.21, seed: int = 0) -> SplitResult:
    """The official UCF-101 split `fold`: `trainlist0N.txt` (`Class/v_..avi <label>`) and `testlist0N.txt`.

    The lists spell some classes differently from the folders (HandStandPushups / HandstandPushups), so keys
    are matched case-insensitively. Val is carved from train.
    """
    folder = Path(folder)
    _check_folder(folder, fold, f"UCF-101 lists trainlist0{fold}.txt and testlist0{fold}.txt")
    keys = _Keys(videos, classes, failed)
    entries: list[tuple[str, str]] = []
    for name, path in (("train", folder / f"trainlist{fold:02d}.txt"), ("test", folder / f"testlist{fold:02d}.txt")):
        if not path.is_file():
            raise SplitError(f"{path}: no such split list; --ucf101 must be the folder of the official "
                             "ucfTrainTestlist files")
        for lineno, line in _read_lines(path):
            listed = line.split()[0].replace("\\", "/")
            if "/" not in listed:
                raise SplitError(f"{path}:{lineno}: expected 'Class/v_Class_gNN_cNN.avi', got {line!r}")
            entries.append((listed, name))
    chosen, left_out = _assign(entries, keys, f"{folder} (fold {fold})")
    return _finish(chosen["train"], chosen["test"], videos, left_out, val, seed,
                   f"none of the clips UCF-101 fold {fold} lists for it is in the cache")


# --- split files -------------------------------------------------------------------------------------


def write_splits(out_dir: str | Path, splits: dict[str, list[str]]) -> list[Path]:
    """`out_dir/{train,val,test}.txt`, one key per line, sorted, each written atomically."""
    out_dir = Path(out_dir)
    paths = []
    for name in SPLIT_NAMES:
        path = out_dir / f"{name}.txt"
        write_text_atomic(path, "".join(f"{key}\n" for key in sorted(splits[name])))
        paths.append(path)
    return paths


def read_split(out_dir: str | Path, name: str) -> list[str]:
    """The keys of split `name` (train | val | test) written by `write_splits`."""
    path = Path(out_dir) / f"{name}.txt"
    if not path.is_file():
        raise SplitError(f"{path}: no such split file; run `python -m pipeline split` first")
    keys = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not keys:
        raise SplitError(f"{path}: the {name} split is empty; rerun `python -m pipeline split` "
                         "(with more clips per class or other ratios)")
    return keys
