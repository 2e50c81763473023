"""The int8 trunk (`extract.precision: int8`): the fallback line where it cannot run, the deterministic choice
of calibration frames, one calibration per cache, and the recorded calibration rebuilding the same bytes.

Lean on purpose (tiny images, random weights): quantising and compiling VGG-16 costs seconds even at 32 px.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.config import ExtractConfig
from pipeline.features import calibration, int8
from pipeline.features.backbone import Backbone, resolve_precision
from pipeline.features.extractor import ExtractError
from pipeline.features.provenance import settings_mismatch
from pipeline.features.reader import open_cache
from stages import extract

TINY = dict(weights="random:0", frames=4, image_size=32, layer="conv5_3", workers=1, device="cpu")


def _no_torchao():
    raise ImportError("No module named 'torchao'")


@pytest.mark.parametrize("missing", ["instructions", "library"])
def test_where_int8_cannot_run_one_line_says_so_and_auto_s_precision_runs(monkeypatch, capsys, missing):
    if missing == "instructions":
        monkeypatch.setattr(int8, "cpu_supports_int8", lambda: False)
    else:
        monkeypatch.setattr(int8, "_quantizer_api", _no_torchao)
    model = Backbone("random:0", layer="conv5_3", image_size=32, device="cpu", precision="int8")
    fallback = resolve_precision("auto", torch.device("cpu"))
    assert model.precision == fallback and not model.needs_calibration and model.quantization == "none"
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "int8 is unavailable here" in lines[0] and f"at {fallback} instead" in lines[0]
    assert ("VNNI" in lines[0]) if missing == "instructions" else ("torchao" in lines[0])
    assert model.embed(torch.zeros(2, 40, 40, 3, dtype=torch.uint8)).shape == (2, 512, 2, 2)


def test_calibration_clips_depend_on_the_dataset_only_and_spread_over_its_classes():
    keys = [f"{c}/clip{i:02d}.avi" for c in ("fight", "noFight", "walk") for i in range(10)]
    shuffled = random.Random(0).sample(keys, len(keys))
    chosen = [keys[i] for i in calibration.choose(keys)]
    assert [shuffled[i] for i in calibration.choose(shuffled)] == chosen  # the listing order does not matter
    assert len(chosen) == len(keys) and sorted(chosen) == sorted(keys)  # the picks, then every other as a spare
    picks = chosen[:calibration.CLIPS]
    assert len(set(picks)) == calibration.CLIPS and {k.split("/")[0] for k in picks} == {"fight", "noFight", "walk"}
    assert calibration.choose(keys[:3]) == [0, 1, 2] and calibration.choose([]) == []
    assert calibration.frame_positions(30) == [1, 5, 9, 13, 16, 20, 24, 28]
    assert calibration.frame_positions(4) == [0, 1, 2, 3]


def test_a_cache_made_before_int8_has_quantization_none():
    old = {"backbone": "vgg16", "frames": 30}
    assert settings_mismatch(old, dict(old, quantization="none")) == []
    record = int8.record([[0.1, 0]], ["a/x.avi"], 8, "0" * 64)
    diffs = settings_mismatch(old, dict(old, quantization=record))
    assert len(diffs) == 1 and "int8, calibrated on 8 frames of 1 clips" in diffs[0] and "qparams" not in diffs[0]


@pytest.mark.skipif(int8.unavailable(torch.device("cpu")) is not None,
                    reason=f"int8 cannot run here: {int8.unavailable(torch.device('cpu'))}")
def test_an_int8_cache_holds_one_calibration_that_rebuilds_the_same_bytes(mini_dataset, tmp_path):
    cache = tmp_path / "f.h5"
    summary = extract.run(mini_dataset, cache, ExtractConfig(precision="int8", **TINY), progress=False)
    assert summary.extracted == 6 and summary.quantize_seconds > 0
    with open_cache(cache) as c:
        record, videos, stored = c.settings["quantization"], c.videos, c.load()
        assert c.precision_summary == "int8" and set(c.trunk) == {"compiled"}
        frame_index = c.frame_index
    assert sorted(record["calibration"]["clips"]) == videos  # 6 clips: every one calibrates, 4 frames each
    assert len(record["qparams"]) == 13  # one activation quantizer at the input of each of the 13 convs
    with pytest.raises(ExtractError, match="quantization: cache has 'int8, calibrated on 24 frames of 6 clips"):
        extract.run(mini_dataset, cache, ExtractConfig(precision="fp32", **TINY), progress=False)
    again = Backbone("random:0", layer="conv5_3", image_size=32, device="cpu", precision="int8",
                     quantization=record)  # what a rerun, predict, watch and a Ray actor do
    assert again.quantization == record and again.trunk_form == "compiled"
    from pipeline.video.decode import decode_sampled

    decoded = decode_sampled(mini_dataset / videos[0], 4)
    assert np.array_equal(decoded.frame_index, frame_index[0])
    assert np.array_equal(again.embed(torch.from_numpy(decoded.frames)).half().numpy(), stored[0])
