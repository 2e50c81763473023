"""params.yaml and flags go through one validation: values as people and tools write them, one-line errors."""
from __future__ import annotations

import pytest

from pipeline.config import SECTIONS, ConfigError, HeadConfig, TrainConfig, check, load_section, make
from tests.cli_helpers import assert_one_line_error


def write(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_yaml_1_1_exponent_strings_and_whole_floats_are_read_as_numbers(tmp_path):
    # YAML 1.1 reads 3e-4 as a string; `dvc exp run -S train.epochs=2.0` writes a float
    cfg = load_section("train", write(tmp_path, "train:\n  lr: 3e-4\n  epochs: 2.0\n  attention_reg: '1e-3'\n"))
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)
    assert cfg.epochs == 2 and isinstance(cfg.epochs, int)
    assert cfg.attention_reg == pytest.approx(1e-3)


def test_integers_are_accepted_where_floats_are_expected(tmp_path):
    cfg = load_section("train", write(tmp_path, "train:\n  lr: 1\n  max_memory_gb: 4\n"))
    assert isinstance(cfg.lr, float) and isinstance(cfg.max_memory_gb, float)


@pytest.mark.parametrize("text, fragments", [
    ("train:\n  lr: fast\n", ["train.lr", "'fast'", "a number"]),
    ("train:\n  epochs: 2.5\n", ["train.epochs", "2.5", "whole number"]),
    ("train:\n  epochs: true\n", ["train.epochs", "True", "whole number"]),
    ("train:\n  lr: .nan\n", ["train.lr", "finite"]),
    ("train:\n  lr: -1\n", ["train.lr", "> 0"]),
    ("train:\n  lrate: 1\n", ["train", "unknown key", "lrate", "known:", "lr"]),
    ("tarin:\n  lr: 1\n", ["unknown section", "tarin", "train"]),
    ("train: 3\n", ["section 'train'", "mapping"]),
    ("head:\n  cell: gru\n", ["head.cell", "'gru'", "convlstm, lstm, mean"]),
    ("head:\n  kernel: 2\n", ["head.kernel", "odd"]),
    ("head:\n  dropout: 1.0\n", ["head.dropout", ">= 0 and < 1"]),
    ("extract:\n  layer: fc7\n", ["extract.layer", "pool5, conv5_3"]),
    ("synth:\n  width: 63\n", ["synth.width", "even"]),
    ("evaluate:\n  split: dev\n", ["evaluate.split", "train, val, test"]),
    ("render:\n  weights: 3\n", ["render", "unknown key", "weights"]),
    ("train:\n  schedule: 3\n", ["train.schedule", "expected text"]),
])
def test_a_bad_value_is_one_line_naming_section_key_value_and_what_is_allowed(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_section("train", path)  # any section's mistake stops every command: no hour of extract first
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_flags_go_through_the_same_checks_as_the_file(tmp_path):
    path = write(tmp_path, "train:\n  lr: 3e-4\n")
    assert load_section("train", path, epochs=5).epochs == 5
    with pytest.raises(ConfigError, match=r"the command line: train\.epochs = 0: must be >= 1"):
        load_section("train", path, epochs=0)


def test_the_python_api_gets_the_same_conversion_and_checks():
    assert check(TrainConfig(lr="3e-4", epochs=2.0)) == TrainConfig(lr=3e-4, epochs=2)
    with pytest.raises(ConfigError, match="head.channels"):
        check(HeadConfig(channels=0))


def test_every_default_passes_its_own_checks():
    for name, cls in SECTIONS.items():
        assert make(name, {}) == cls()


def test_the_shipped_params_file_is_valid():
    from pathlib import Path

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    for name in SECTIONS:
        load_section(name, params)


def test_cli_reports_a_bad_params_file_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from pipeline.__main__ import app

    path = write(tmp_path, "train:\n  epochs: two\n")
    result = CliRunner().invoke(app, ["split", str(tmp_path / "missing.h5"), str(tmp_path / "s"),
                                      "--params", str(path)])
    assert_one_line_error(result, "train.epochs", "'two'")


def test_the_shipped_params_yaml_writes_out_every_setting_of_every_section():
    """So `dvc exp run -S section.key=...` and a reader find every setting there, not only in the code."""
    import dataclasses
    from pathlib import Path

    import yaml

    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    missing = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
               if f.name not in (shipped.get(name) or {})]
    assert not missing, f"params.yaml lacks {', '.join(missing)}"


def test_every_setting_has_the_help_its_flag_shows():
    """A setting is declared once, on its dataclass: its help there is what `--help` says of its flag."""
    import dataclasses

    from pipeline.config import help_of

    missing = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls) if not help_of(f)]
    assert not missing, f"settings without help: {', '.join(missing)}"


def test_a_field_of_a_section_is_a_flag_of_the_command_that_reads_it(tmp_path):
    """Adding a field to a config dataclass is all it takes: the flag exists and overrides params.yaml."""
    from typer.testing import CliRunner

    from pipeline.__main__ import app

    shown = " ".join(CliRunner().invoke(app, ["evaluate", "--help"], env={"COLUMNS": "250"}).stdout.split())
    assert "--deletion-draws" in shown and "Random deletions per k" in shown
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "missing.h5"), "--deletion-draws", "-1",
                                      "--params", str(write(tmp_path, "evaluate:\n  deletion_draws: 3\n"))])
    assert_one_line_error(result, "the command line: evaluate.deletion_draws = -1")
