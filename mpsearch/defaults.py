"""The user-facing defaults of a search, in one light module (no torch, Optuna or MLflow), so that
the API's keyword defaults and the command line's flags and help share one source.

The quantizer's defaults are those of `mpsearch.scoring.evaluator.QuantSettings`, calibration's those of
`mpsearch.calibration.cpu.calibrate`; the command line reads them from there.
"""

from __future__ import annotations

DEFAULT_TARGET = "x86-vnni"
DEFAULT_TRIALS = 50
DEFAULT_SEED = 0
DEFAULT_BATCH_SIZE = 1
STRATEGIES = ("hybrid", "optuna", "ilp", "exhaustive")
DEFAULT_STRATEGY = "hybrid"
SAMPLERS = ("tpe", "nsga2", "nsga3", "random", "qmc", "gp")
DEFAULT_SAMPLER = "tpe"
SENSITIVITY_METHODS = ("fisher", "exact")  # mpsearch.engine.sensitivity: estimated, measured
DEFAULT_SENSITIVITY = "fisher"
EXHAUSTIVE_LIMIT = 100_000  # the largest space the exhaustive strategy enumerates
COMPARE_OBJECTIVES = "metric,bops"  # a compare's default objectives: the cost no target owns
BACKENDS = ("local", "ray")
DEFAULT_BACKEND = "local"
DEFAULT_WORKER_THREADS = 1  # torch threads (and Ray CPUs) per Ray worker
DEFAULT_RETRIES = 1  # runs of a trial whose worker died before it is recorded as failed
DEFAULT_EXPERIMENT = "mpsearch"  # MLflow experiment
OUT_ROOT = "mpsearch-out"  # default output directory: OUT_ROOT/<task>-<target>-<time>
STUDY_FILE = "study.log"  # a search's own Optuna study: the journal file OUT/STUDY_FILE
