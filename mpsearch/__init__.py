"""mpsearch: mixed-precision quantization search under hardware budgets.

The public names are imported on first use, so that `import mpsearch.<module>` for a light
module (the GPU calibration, the analysis) does not load Optuna, MLflow and the search stack.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
_PUBLIC = {
    "MpsearchError": "mpsearch.errors",
    "SearchResult": "mpsearch.result",
    "Task": "mpsearch.tasks.base",
    "TrialRecord": "mpsearch.result",
    "apply": "mpsearch.export",
    "compare": "mpsearch.api",
    "search": "mpsearch.api",
    "verify": "mpsearch.deploy.verify",
}
__all__ = ["MpsearchError", "SearchResult", "Task", "TrialRecord", "__version__", "apply", "compare", "search",
           "verify"]

if TYPE_CHECKING:  # pragma: no cover
    from mpsearch.api import compare, search
    from mpsearch.deploy.verify import verify
    from mpsearch.errors import MpsearchError
    from mpsearch.export import apply
    from mpsearch.result import SearchResult, TrialRecord
    from mpsearch.tasks.base import Task


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`mpsearch.compare` is the function (mpsearch.api.compare), although a submodule of that name
    exists: importing the submodule binds it as the package's attribute, which would shadow the
    function for the rest of the process (after any search, `mpsearch.compare(...)` raised
    "'module' object is not callable")."""

    @property
    def compare(self):
        from mpsearch.api import compare

        return compare

    @compare.setter
    def compare(self, value) -> None:
        pass  # the import system binding the submodule mpsearch.compare: the function stays


sys.modules[__name__].__class__ = _Package
