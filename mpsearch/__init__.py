"""mpsearch: mixed-precision quantization search under hardware budgets."""

from mpsearch.api import compare, search
from mpsearch.errors import MpsearchError
from mpsearch.export import apply
from mpsearch.result import SearchResult, TrialRecord
from mpsearch.tasks.base import Task

__version__ = "0.1.0"
__all__ = ["MpsearchError", "SearchResult", "Task", "TrialRecord", "__version__", "apply", "compare", "search"]
