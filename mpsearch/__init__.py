"""mpsearch: mixed-precision quantization search under hardware budgets.

The public names (below) are imported on first use, so that `import mpsearch.<module>` for a
light module (the GPU calibration, the analysis) does not load Optuna, MLflow and the search stack.

The package, by concern (each subpackage's docstring says what it owns and, on its "May import:"
line, which parts of mpsearch it may import; tests/test_imports.py holds the code to those lines):
  api, cli     the faces: `mpsearch.search(...)` and the command line (parses and prints)
  engine/      SearchOptions, space set-up, storages, the trial loop, strategies, ILP, sensitivity
  scoring/     model analysis, quantizers, AdaRound, folding, the Evaluator
  deploy/      the deployed ONNX graph, ONNX Runtime timing, faithfulness, export, verify
  calibration/ fitting CPU and GPU profiles to measurements
  results/     result.json, objectives and Pareto, the best trial, compare, MLflow tracking
  report/      text and HTML views of results
  tasks/, executors/   built-in and user tasks; where candidates are scored (local, Ray)
  errors, defaults, cache, host, outlock, metrics, targets, onnx_export: shared pieces every part
  may use; they import only one another and tasks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
_PUBLIC = {
    "MpsearchError": "mpsearch.errors",
    "SearchResult": "mpsearch.results.records",
    "Task": "mpsearch.tasks.base",
    "TrialRecord": "mpsearch.results.records",
    "apply": "mpsearch.deploy.export",
    "compare": "mpsearch.api",
    "search": "mpsearch.api",
    "verify": "mpsearch.deploy.verify",
}
__all__ = ["MpsearchError", "SearchResult", "Task", "TrialRecord", "__version__", "apply", "compare", "search",
           "verify"]

if TYPE_CHECKING:  # pragma: no cover
    from mpsearch.api import compare, search
    from mpsearch.deploy.export import apply
    from mpsearch.deploy.verify import verify
    from mpsearch.errors import MpsearchError
    from mpsearch.results.records import SearchResult, TrialRecord
    from mpsearch.tasks.base import Task


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

