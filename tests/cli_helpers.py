"""Running the CLI from tests: as a subprocess or in process, and checking one-line user errors."""
from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, with built-in defaults (no params.yaml of the repo in the way)."""
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--params", "/nonexistent/params.yaml"],
                          capture_output=True, text=True, timeout=timeout, env=env)


def run_in_process(*args: str, **invoke):
    """The CLI in this process (no second torch start-up), with built-in defaults; `invoke`: CliRunner.invoke's."""
    from typer.testing import CliRunner

    from pipeline.__main__ import app

    return CliRunner().invoke(app, [*args, "--params", "/nonexistent/params.yaml"], env={"COLUMNS": "250"}, **invoke)


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit status 2, one red line on stderr naming `fragments`, no traceback."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exception, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
