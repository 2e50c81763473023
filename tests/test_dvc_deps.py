"""dvc.yaml against the code: every stage's deps list all the project code the stage runs, derived from the source.

`dvc status` can only call a stage stale when a file it lists changed. So for every stage this test takes its
`cmd` (`python -m pipeline <command> ...`), finds the command's function in the CLI (`pipeline/__main__.py`) and
the `stages/<module>.py` it dispatches to, and follows the imports with `ast` (nothing is imported or run):

* every `import` / `from ... import` counts, at module level *and* inside functions, classes, `try` and `if`
  blocks (the CLI and the stages import torch and friends inside functions so `--help` is instant; the same
  goes for project modules), and so do `importlib.import_module("pipeline.x")` / `__import__` with a constant
  name. `if TYPE_CHECKING:` imports count too: counting one that never runs costs a rerun, missing one that
  does run costs a stale output.
* `from pipeline import x` means `pipeline/x.py` (or the package `pipeline/x/`) when that exists, else a name
  of `pipeline/__init__.py`; relative imports (`from . import x`, `from .x import y`, `from .. import z`) are
  resolved against the importing module's package; a module inside a package also runs each package's
  `__init__.py` on the way, so those count as well.
* Project modules are `pipeline.*` and `stages.*`: files under `pipeline/` and `stages/` of this checkout.
  Modules added later (say `pipeline/errors.py`, or `pipeline/video/` as a package) are found the same way,
  so a stage that starts importing one fails here until dvc.yaml lists it.

Decisions:

* `pipeline/__main__.py` counts, for every stage. It is code on every stage's path, not just a skin: it turns
  params.yaml and the flags into the stage's config (which sections each command reads; pipeline/flags.py, which it
  imports, makes their flags), and it holds defaults that params.yaml does not set and that change what a stage writes
  (train's `--metrics`/`--plots` paths, evaluate's `--plots` and `--device`, render's `--split`, `--splits`,
  `--metrics` and `--train-plots`), and it decides exit statuses. Leaving it out would be the very bug this test is
  for (pipeline/config.py holding defaults that params.yaml does not set). What it does count is scoped to the
  command: its function, the module-level imports, and the `__main__` helpers that function uses (followed by name);
  the imports inside the *other* commands' functions do not count (otherwise every stage would depend on every
  `stages/*.py`). The price: editing a help text reruns the graph; extract then resumes its persisted cache (same
  settings, nothing to decode), so that is cheap.
* No exceptions for "presentation" helpers: `pipeline/files.py` writes the outputs (JSON indent, TSV number
  format: the bytes DVC hashes), `pipeline/errors.py` shapes the failure reasons extract records in the
  cache, `pipeline/progress.py` can crash a stage (as rich's Progress.reset did with a missing field). Every
  project module a stage imports is a dep.
* Over-listing fails too (a listed `pipeline/` or `stages/` file that the stage does not import, or that does
  not exist): the lists stay exact, so an extra dep is a deliberate choice, not a leftover. A folder dep
  (`pipeline/video`) covers the files in it.

Besides the code, evaluate reads ground-truth boxes (`boxes.json`) from the cache's dataset root,
`${data.videos}`, so its deps must cover that file; and outputs declared `cache: false` (metrics, plots,
splits/summary.json) are git's to keep (DVC's convention; `dvc exp show` reads them from the commits), so
.gitignore must not ignore them.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLI = "pipeline/__main__.py"
PROJECT_PACKAGES = ("pipeline", "stages")


# --- dvc.yaml ---------------------------------------------------------------------------------------------


def _dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def _params() -> dict:
    path = REPO / "params.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _interpolate(text: str, params: dict) -> str:
    """DVC's `${a.b}` from params.yaml (DVC loads it for interpolation by default)."""

    def value(match: re.Match) -> str:
        node = params
        for key in match.group(1).strip().split("."):
            assert isinstance(node, dict) and key in node, f"dvc.yaml uses ${{{match.group(1)}}}: not in params.yaml"
            node = node[key]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def _norm(path: str) -> str:
    return PurePosixPath(os.path.normpath(path.replace("\\", "/"))).as_posix()


def _entries(items) -> list[tuple[str, dict]]:
    """A dvc.yaml list of paths, each a string or a one-key mapping {path: options}."""
    out = []
    for item in items or []:
        if isinstance(item, str):
            out.append((item, {}))
        else:
            (path, options), = item.items()
            out.append((path, options or {}))
    return out


def _deps(stage: dict, params: dict) -> list[str]:
    return [_norm(_interpolate(path, params)) for path, _ in _entries(stage.get("deps"))]


def _covered(path: str, deps: list[str]) -> bool:
    """A listed file, or a listed folder above it."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def _cli_command(stage_name: str, cmd) -> str:
    assert isinstance(cmd, str), f"stage {stage_name}: one `cmd` string expected, got {cmd!r}"
    argv = shlex.split(cmd)
    for i in range(len(argv) - 2):
        if argv[i].rsplit("/", 1)[-1].startswith("python") and argv[i + 1:i + 3] == ["-m", "pipeline"]:
            assert i + 3 < len(argv), f"stage {stage_name}: `{cmd}` names no command"
            return argv[i + 3]
    raise AssertionError(f"stage {stage_name}: cmd `{cmd}` does not run `python -m pipeline <command>`, so its "
                         f"code deps cannot be derived; run it through the CLI or teach this test the new form")


# --- the import graph, from the source --------------------------------------------------------------------


def _module_file(name: str) -> str | None:
    """`pipeline.x` -> 'pipeline/x.py' or 'pipeline/x/__init__.py' when in this checkout; else None."""
    parts = name.split(".")
    if not parts or parts[0] not in PROJECT_PACKAGES or not all(p.isidentifier() for p in parts):
        return None
    base = REPO.joinpath(*parts)
    for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(REPO).as_posix()
    return None


def _module_name(rel: str) -> str:
    parts = list(PurePosixPath(rel).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(rel: str) -> str:
    """The package relative imports in `rel` start from."""
    name = _module_name(rel)
    return name if rel.endswith("/__init__.py") else name.rpartition(".")[0]


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a, a.b and a.b.c."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imported_names(nodes, rel: str) -> set[str]:
    """Dotted names of every module the statements under `nodes` import (at any depth)."""
    names: set[str] = set()
    for root in nodes:
        for node in ast.walk(root):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    names.update(_with_parents(alias.name))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = _package_of(rel).split(".") if _package_of(rel) else []
                    keep = len(package) - (node.level - 1)
                    assert keep > 0, f"{rel}:{node.lineno}: relative import beyond the top-level package"
                    base = ".".join(package[:keep] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base == "__future__":
                    continue
                names.update(_with_parents(base))
                for alias in node.names:
                    if alias.name != "*":
                        names.add(f"{base}.{alias.name}")  # a submodule when such a file exists (checked later)
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if called in ("import_module", "__import__"):
                    target = node.args[0].value
                    if target.startswith("."):
                        package = next((k.value.value for k in node.keywords if k.arg == "package"
                                        and isinstance(k.value, ast.Constant)), None)
                        if package is None and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                            package = node.args[1].value
                        if not isinstance(package, str):
                            continue
                        dots = len(target) - len(target.lstrip("."))
                        head = package.split(".")[:len(package.split(".")) - (dots - 1)]
                        target = ".".join(head + ([target.lstrip(".")] if target.lstrip(".") else []))
                    names.update(_with_parents(target))
    return names


@lru_cache(maxsize=None)
def _parse(rel: str) -> ast.Module:
    return ast.parse((REPO / rel).read_text(encoding="utf-8"), filename=rel)


@lru_cache(maxsize=None)
def _direct_imports(rel: str) -> frozenset[str]:
    """Project files the module `rel` imports directly, anywhere in it."""
    files = {_module_file(n) for n in _imported_names([_parse(rel)], rel)}
    return frozenset(f for f in files if f and f != rel)


def _closure(roots) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        todo.extend(_direct_imports(rel) - seen)
    return seen


def _is_app_command(decorator: ast.expr) -> tuple[bool, str | None]:
    """(is `@<app>.command(...)` or `@command(<app>, ...)` (pipeline/flags.py), the explicit name given to it)."""
    call = decorator if isinstance(decorator, ast.Call) else None
    func = call.func if call else decorator
    if isinstance(func, ast.Attribute) and func.attr == "command":
        named = call.args[:1] if call else []
    elif isinstance(func, ast.Name) and func.id == "command" and call is not None:
        named = call.args[1:2]
    else:
        return False, None
    name = None
    if call is not None:
        if named and isinstance(named[0], ast.Constant) and isinstance(named[0].value, str):
            name = named[0].value
        for keyword in call.keywords:
            if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                name = keyword.value.value
    return True, name


@lru_cache(maxsize=None)
def _cli_commands() -> dict[str, ast.FunctionDef]:
    """The CLI's commands by the name a user types (typer: function name, '_' -> '-', unless named)."""
    commands = {}
    for node in _parse(CLI).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                is_command, name = _is_app_command(decorator)
                if is_command:
                    commands[name or node.name.replace("_", "-")] = node
    return commands


def _local_names(fn: ast.FunctionDef) -> set[str]:
    """Names a function binds itself (parameters, assignments, imports): they shadow the module's functions
    (evaluate's `split` parameter is not the `split` command)."""
    args = fn.args
    names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg] if a}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not fn:
            names.add(node.name)
    return names


def _cli_part(command: str) -> set[str]:
    """Project files the CLI's side of `command` imports: module level, its function, the helpers it uses."""
    tree = _parse(CLI)
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    commands = _cli_commands()
    module_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    used, todo = set(), [commands[command]]
    while todo:
        fn = todo.pop()
        if fn.name in used:
            continue
        used.add(fn.name)
        local = _local_names(fn)
        for node in ast.walk(fn):
            if isinstance(node, ast.Name) and node.id in functions and node.id not in used | local:
                todo.append(functions[node.id])
    # Module-level code that names a helper (a default value, a table) uses it as well.
    for stmt in module_level:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and node.id in functions and functions[node.id] is not commands[command] \
                    and node.id not in used:
                used.add(node.id)
    nodes = module_level + [functions[name] for name in used]
    files = {_module_file(n) for n in _imported_names(nodes, CLI)}
    return {f for f in files if f and f != CLI}


def _stage_code(command: str) -> tuple[str, set[str]]:
    """(the stages/ module the command dispatches to, every project file the stage runs)."""
    direct = _cli_part(command)
    targets = sorted(f for f in direct if f.startswith("stages/") and f != "stages/__init__.py")
    assert len(targets) == 1, f"`python -m pipeline {command}` should dispatch to one stages/ module, found {targets}"
    return targets[0], _closure(direct) | {CLI}


def _stages() -> dict[str, dict]:
    stages = _dvc_yaml().get("stages") or {}
    assert stages, "dvc.yaml has no stages"
    return stages


# --- the tests --------------------------------------------------------------------------------------------


def test_the_import_scanner_sees_what_the_stages_import():
    """The scanner itself, on imports this checkout is known to make (module level, in functions, `as`)."""
    assert _module_file("pipeline.config") == "pipeline/config.py"
    assert _module_file("pipeline") == "pipeline/__init__.py"
    assert _module_file("numpy") is None and _module_file("pipeline.load_section") is None
    assert {"synth", "extract", "split", "train", "evaluate", "render", "predict", "info"} <= set(_cli_commands())
    stage, code = _stage_code("evaluate")
    assert stage == "stages/evaluate.py"
    # evaluate: `from pipeline.report import faithfulness` (module level, submodules by from-import), and
    # through metrics `attention_quality`; the head's inference (head/infer.py); the CLI's
    # `from pipeline.config import load_section`.
    assert {"pipeline/report/attention_quality.py", "pipeline/report/faithfulness.py", "pipeline/head/infer.py",
            "pipeline/config.py", CLI} <= code
    # render imports pipeline.report.metrics, and no other stage.
    render = _stage_code("render")[1]
    assert "pipeline/report/metrics.py" in render and "stages/evaluate.py" not in render
    # The CLI's other commands do not leak into a stage: only extract's function imports stages/extract.py.
    assert "stages/extract.py" not in code and "stages/predict.py" not in code


def test_relative_and_dynamic_imports_resolve():
    """`from . import x`, `from .x import y`, `from .. import z`, import_module(): resolved like Python does."""
    source = (
        "from . import decode\n"
        "from .boxes import read_boxes\n"
        "def f():\n"
        "    from .. import config\n"
        "    from ..features import FeatureCache\n"
        "    import importlib\n"
        "    importlib.import_module('pipeline.splits')\n"
        "    __import__('stages.split')\n"
        "    importlib.import_module('..batches', package='pipeline.video')\n"
    )
    names = _imported_names([ast.parse(source)], "pipeline/video/fake.py")
    assert {"pipeline", "pipeline.video", "pipeline.video.decode", "pipeline.video.boxes", "pipeline.config",
            "pipeline.features", "pipeline.splits", "stages", "stages.split", "pipeline.batches"} <= names
    # In a package's __init__.py, `.` is that package itself.
    assert "pipeline.video.decode" in _imported_names([ast.parse("from . import decode")], "pipeline/video/__init__.py")
    with pytest.raises(AssertionError, match="beyond the top-level package"):
        _imported_names([ast.parse("from .. import x")], "pipeline/fake.py")


@pytest.mark.parametrize("stage_name", list(_stages()))
def test_stage_deps_list_every_project_module_it_imports(stage_name):
    stage = _stages()[stage_name]
    command = _cli_command(stage_name, stage.get("cmd"))
    assert command in _cli_commands(), \
        f"stage {stage_name}: `python -m pipeline {command}` is no command of {CLI} ({sorted(_cli_commands())})"
    module, code = _stage_code(command)
    deps = _deps(stage, _params())
    missing = sorted(f for f in code if not _covered(f, deps))
    assert not missing, (f"dvc.yaml stage '{stage_name}' (runs {module}) does not list the project code it "
                         f"imports, so `dvc status` misses edits there. Add to its deps: {', '.join(missing)}")


@pytest.mark.parametrize("stage_name", list(_stages()))
def test_stage_code_deps_exist_and_are_imported(stage_name):
    stage = _stages()[stage_name]
    module, code = _stage_code(_cli_command(stage_name, stage.get("cmd")))
    code_deps = [d for d in _deps(stage, _params()) if d.split("/")[0] in PROJECT_PACKAGES]
    gone = [d for d in code_deps if not (REPO / d).exists()]
    assert not gone, f"dvc.yaml stage '{stage_name}' lists code that does not exist: {', '.join(gone)}"
    unused = [d for d in code_deps if not any(_covered(f, [d]) for f in code)]
    assert not unused, (f"dvc.yaml stage '{stage_name}' (runs {module}) lists code it never imports (an edit there "
                        f"reruns it for nothing): {', '.join(unused)}")


def _boxes_file_name() -> str:
    """`BOXES_FILE = "..."`, wherever the project defines it."""
    for path in sorted(REPO.glob("pipeline/**/*.py")):
        for node in ast.walk(_parse(path.relative_to(REPO).as_posix())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and any(
                    isinstance(t, ast.Name) and t.id == "BOXES_FILE" for t in node.targets):
                return node.value.value
    return "boxes.json"


def test_evaluate_depends_on_the_boxes_file():
    """evaluate scores attention against `<dataset root>/boxes.json` (the cache's dataset root: `${data.videos}`)."""
    params = _params()
    boxes = _norm(f"{params['data']['videos']}/{_boxes_file_name()}")
    deps = _deps(_stages()["evaluate"], params)
    assert _covered(boxes, deps), f"dvc.yaml stage 'evaluate' reads {boxes} but lists neither it nor a folder above it"


def _outs(stage: dict, params: dict) -> list[tuple[str, bool]]:
    """(path, cached) of every output of a stage: outs, metrics and plots."""
    found = []
    for section in ("outs", "metrics", "plots"):
        for path, options in _entries(stage.get(section)):
            found.append((_norm(_interpolate(path, params)), options.get("cache", True)))
    return found


def test_uncached_outputs_are_not_git_ignored():
    """`cache: false` outputs are git's to keep: ignored, `dvc exp show` shows '!' for every experiment."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    params = _params()
    uncached = [path for stage in _stages().values() for path, cached in _outs(stage, params) if not cached]
    assert uncached, "dvc.yaml declares no cache: false output; is this test still needed?"
    # --no-index: judge the patterns, whether or not the files exist or are committed yet.
    ignored = subprocess.run([git, "check-ignore", "--no-index", "--stdin"], cwd=REPO, capture_output=True,
                             text=True, input="\n".join(uncached) + "\n").stdout.split()
    assert not ignored, (f".gitignore ignores outputs dvc.yaml keeps out of DVC's cache (cache: false), so no "
                         f"commit or experiment holds them: {', '.join(ignored)}")
