"""How a CLI command turns into a stage call: its setting flags made from the config, user errors as one line.

A setting is declared once, as a field of its section's dataclass in pipeline/config.py (type, default,
rule, help). A command names the sections it reads with `section("train")` as a parameter's default; each
field of that section becomes a flag (`--batch-size`), typed like the field and defaulting to None, "not
given", so the command receives the section's config with params.yaml (`--params`) under the flags given.
`--help` shows, for each flag, the value in force: params.yaml's where ./params.yaml sets it, else the code's.
Adding a field to a config dataclass is therefore all it takes to give its commands a flag.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer

from pipeline.config import SECTIONS, ConfigError, code_default, help_of, load_section, read_params
from pipeline.errors import UserError

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params",
                             help="params.yaml to read defaults from (absent: built-in defaults).")
PROGRESS_OPTION = typer.Option(True, help="Show a progress bar.")
_TYPES = {"int": int, "float": float, "str": str}


@dataclasses.dataclass(frozen=True)
class _Section:
    name: str


def section(name: str) -> Any:
    """A command parameter's default meaning "the config of params.yaml's section `name`, under its flags"."""
    return _Section(name)


@functools.lru_cache(maxsize=1)
def _params_here() -> dict:
    try:
        return read_params()
    except ConfigError:  # the command itself says what is wrong with it; --help still works
        return {}


def shown_default(section: str, key: str) -> str:
    """What --help shows as a setting's default: its value in ./params.yaml where that sets it, else the code's."""
    value = (_params_here().get(section) or {}).get(key)
    if value is None:
        return f"built-in {section}.{key}: {code_default(section, key)}"
    return f"params.yaml {section}.{key}: {value}"


def _flag(section: str, f: dataclasses.Field) -> inspect.Parameter:
    option = typer.Option(None, show_default=shown_default(section, f.name), help=help_of(f))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=Optional[_TYPES[str(f.type)]])


def err(message: str) -> None:
    """One red line on stderr."""
    from rich.console import Console
    from rich.markup import escape

    # messages quote paths and formats ("[x0, y0, x1, y1]"): text, never markup
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)


@contextmanager
def user_errors() -> Iterator[None]:
    """Errors a user can cause become one red line and exit status 2; programming errors still raise."""
    try:
        yield
    except KeyboardInterrupt:
        err("interrupted; finished work is kept and a rerun resumes")
        raise typer.Exit(130)
    except UserError as exc:
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else "0"
        err(str(exc) if rank == "0" else f"rank {rank}: {exc}")  # torchrun: each rank says it, rank 0 plainly
        raise typer.Exit(2)


def command(app: typer.Typer, name: str | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Registers a function as a command of `app`, as `_wired` makes it."""
    return lambda function: app.command(name)(_wired(function))


def _wired(function: Callable[..., None]) -> Callable[..., None]:
    """`function` as typer sees it: each `section(...)` parameter spread into its fields' flags, user errors
    as one line. It is called with the loaded configs in their place."""
    own = inspect.signature(function, eval_str=True).parameters.values()
    sections = {p.name: p.default.name for p in own if isinstance(p.default, _Section)}
    shown: list[inspect.Parameter] = []
    for p in own:
        if p.name in sections:
            shown += [_flag(sections[p.name], f) for f in dataclasses.fields(SECTIONS[sections[p.name]])]
        else:
            shown.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    names = [p.name for p in shown]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:  # a programming error: a new field named like another section's or the command's own option
        raise TypeError(f"{function.__name__}: flags declared twice: {', '.join(clashes)}")

    @functools.wraps(function)
    def run(**given: Any) -> None:
        with user_errors():
            for name, section_name in sections.items():
                flags = {f.name: given.pop(f.name) for f in dataclasses.fields(SECTIONS[section_name])}
                given[name] = load_section(section_name, given["params"], **flags)
            function(**given)

    run.__signature__ = inspect.Signature(shown)
    run.__annotations__ = {p.name: p.annotation for p in shown}
    return run
