"""Typed errors. The CLI turns every MpsearchError into one line on stderr and exit status 2."""

from __future__ import annotations


class MpsearchError(Exception):
    """Base class for every error mpsearch raises on purpose (a user or input error)."""


class UnknownTaskError(MpsearchError):
    """A task name that is neither built in nor a `module:function` reference."""


class TaskLoadError(MpsearchError):
    """A task reference that is malformed, cannot be imported, raises, or returns no Task."""


class UnknownTargetError(MpsearchError):
    """A hardware target name that is not registered."""


class InvalidConfigError(MpsearchError):
    """Search options that cannot work: bad trial count, unknown sampler or precision, ..."""


class UntrustedTaskError(InvalidConfigError):
    """A task named only inside a data file (result.json, a shared study): mpsearch runs code only
    from a task the user names (mpsearch.tasks.trusted_task)."""


class BudgetError(InvalidConfigError):
    """A budget no configuration in the space can meet."""


class OutputDirError(MpsearchError):
    """The output directory cannot be created or written."""


class MissingDependencyError(MpsearchError):
    """An optional dependency is not installed; the message names the extra to install."""


class EvaluationError(MpsearchError):
    """A candidate could not be evaluated (non-finite outputs, model fails to run, ...)."""


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search, after every finished trial was saved. Carries where it went."""

    def __init__(self, message: str, result_path: str):
        super().__init__(message)
        self.result_path = result_path


class ClusterError(MpsearchError):
    """The Ray cluster cannot be reached, joined or used (no CPUs, workers that cannot start)."""
