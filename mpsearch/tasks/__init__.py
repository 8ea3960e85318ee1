"""Built-in tasks and the loader for user tasks.

A task is named by a built-in name (`mpsearch tasks` lists them), by `package.module:function`
(an importable module) or by `path/to/file.py:function` (a file, relative to the current
directory). The function is called with no arguments and must return a `Task`. Built-in task
modules are imported only when asked for, so optional dependencies stay optional.

May import: errors, cache, metrics
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from mpsearch.errors import MpsearchError, TaskLoadError, UnknownTaskError, UntrustedTaskError
from mpsearch.tasks.base import Batch, MetricFn, Task, run_model

__all__ = ["BUILTIN_TASKS", "Batch", "MetricFn", "Task", "list_tasks", "load_task", "run_model", "task_ref",
           "trusted_task"]

# name -> ("module:function", one-line description)
BUILTIN_TASKS: dict[str, tuple[str, str]] = {
    "digits": (
        "mpsearch.tasks.digits:build",
        "8-layer CNN on scikit-learn's 8x8 digits (weights shipped in the package); accuracy",
    ),
    "mobilenet_v2": (
        "mpsearch.tasks.mobilenet:build",
        "torchvision MobileNetV2 (ImageNet weights) on offline photos; top-1 agreement with FP32",
    ),
    "minilm": (
        "mpsearch.tasks.minilm:build",
        "all-MiniLM-L6-v2 sentence embeddings (needs the `nlp` extra)",
    ),
}

_FORMS = "a built-in name, package.module:function or path/to/file.py:function"


def list_tasks() -> list[tuple[str, str]]:
    """(name, description) of every built-in task."""
    return [(name, desc) for name, (_, desc) in BUILTIN_TASKS.items()]


def task_ref(spec: str) -> str:
    """A task reference another process can load: a `file.py:function` with its file made
    absolute; a built-in name or a module reference as it is."""
    where, sep, fn = spec.rpartition(":")
    return f"{Path(where).resolve()}:{fn}" if sep and where.endswith(".py") and Path(where).is_file() else spec


def trusted_task(stored: str, given: str | None, source: str, *, same: bool = False) -> str:
    """The trust boundary: which task to load for work on a data file (`source`: a result.json, a
    shared study) that names the task `stored`. mpsearch runs code only from a task the user names
    on the command line or in an API call (`given`): a built-in task is no user code and is loaded
    by its stored name; a task file or module named only inside the data is refused
    (UntrustedTaskError), saying how to name it. same: `given` must be the stored task (a worker
    runs the study's task, no other)."""
    if given is not None:
        if same and task_ref(given) != task_ref(stored):
            raise UntrustedTaskError(f"{source} runs the task {stored!r}, not {given!r}: a worker runs the study's task")
        return given
    if ":" not in stored and stored in BUILTIN_TASKS:
        return stored
    raise UntrustedTaskError(
        f"{source} names the task {stored!r}: mpsearch runs code only from a task you name; if you trust that file, "
        f"pass --task {stored} (API: task=...)")


def load_task(spec: str) -> Task:
    """The Task that `spec` names: a built-in name, `package.module:function` or `file.py:function`.

    Raises UnknownTaskError for an unknown name, TaskLoadError for a reference that is malformed,
    cannot be imported, raises, or returns something other than a Task. An MpsearchError raised
    by the task itself (MissingDependencyError, a Task validation error, ...) propagates unchanged.
    """
    builtin = ":" not in spec
    if builtin:
        if spec not in BUILTIN_TASKS:
            known = ", ".join(sorted(BUILTIN_TASKS))
            raise UnknownTaskError(f"unknown task {spec!r}: built-in tasks are {known}; "
                                   "or give package.module:function or path/to/file.py:function")
        ref = BUILTIN_TASKS[spec][0]
    else:
        ref = spec
    where, func_name = _split(ref)
    module = _import_file(where) if _is_file(where) else _import_module(where)
    shown = f"{where}:{func_name}"

    try:
        fn = getattr(module, func_name)
    except AttributeError:
        raise TaskLoadError(f"task {shown!r}: {where!r} has no attribute {func_name!r}") from None
    if not callable(fn):
        raise TaskLoadError(f"task {shown!r}: {func_name!r} is a {type(fn).__name__}, not a function")
    try:
        task = fn()
    except MpsearchError:
        raise
    except (Exception, SystemExit) as e:  # sys.exit() in a task's code is its error
        raise TaskLoadError(f"task function {shown} raised {type(e).__name__}: {_one_line(e)}") from e
    if not isinstance(task, Task):
        raise TaskLoadError(f"task function {shown} returned {type(task).__module__}.{type(task).__qualname__}, "
                            "not an mpsearch Task")
    return task


def _split(ref: str) -> tuple[str, str]:
    parts = ref.split(":")
    if len(parts) != 2 or not parts[0].strip() or not parts[1].isidentifier():
        raise TaskLoadError(f"malformed task reference {ref!r}: expected {_FORMS}")
    return parts[0], parts[1]


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except MpsearchError:
        raise
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise TaskLoadError(f"cannot import task module {name!r}: no module named {e.name!r}") from e
        raise TaskLoadError(f"importing task module {name!r} failed: {type(e).__name__}: {_one_line(e)}") from e
    except (Exception, SystemExit) as e:  # sys.exit() in a task's code is its error
        raise TaskLoadError(f"importing task module {name!r} failed: {type(e).__name__}: {_one_line(e)}") from e


def _import_file(where: str) -> ModuleType:
    path = Path(where).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if not path.is_file():
        raise TaskLoadError(f"task file not found: {where} (looked at {path})")
    path = path.resolve()
    # A stable, unique module name per file, registered in sys.modules while it runs
    # (dataclasses and pickling look modules up there).
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    stem = path.stem if path.stem.isidentifier() else "task"
    mod_name = f"mpsearch_user_task_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise TaskLoadError(f"cannot load task file {where}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except MpsearchError:
        sys.modules.pop(mod_name, None)
        raise
    except (Exception, SystemExit) as e:  # sys.exit() in a task's code is its error
        sys.modules.pop(mod_name, None)
        raise TaskLoadError(f"loading task file {where} failed: {type(e).__name__}: {_one_line(e)}") from e
    return module
