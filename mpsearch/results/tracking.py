"""MLflow tracking from the driver: one parent run per search, one child run per trial.

Uses MlflowClient with explicit run ids (nesting through the `mlflow.parentRunId` tag), so it
never touches MLflow's global active-run state. If the tracking store fails (a server that cannot
be reached or dies, a store MLflow refuses such as file:// in maintenance mode, an SQLite file
that cannot be written), the search goes on: the tracker says so in one line on stderr, stops
logging and marks `Tracker.tracking` (the search's result.tracking, result.json's "tracking") off:
run_id None, "off" saying why, "incomplete_run_id" the parent run it had started, if any;
result.json keeps everything.

What a run holds, so that the MLflow UI reads well and runs are queryable:
- params are flat, one per option (`flat_params`): a quantizer setting is `quant.<field>`, a list
  is comma-separated, a flag `true`/`false`, and an option not given (None) is not logged;
- each trial's per-layer precisions are params `layer.<fqn>` = "weight/activation" (query them:
  `params."layer.conv1" = 'int4/int8'`); the best trial's are tags `best.layer.<fqn>` of the parent;
- the FP32 reference (`fp32_latency_ms`, `fp32_<metric name>`) and the speed-up over FP32
  (`speedup_fp32`, the parent's `best_speedup_fp32`) are metrics of the parent and of every child,
  and the task's metric is logged under its own name (`accuracy`, `top1_agreement`, ...);
- the experiment is tagged `mlflow.experimentKind` = custom_model_development, so MLflow 3 opens
  it in its classic runs view rather than its GenAI one.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from mpsearch.defaults import DEFAULT_EXPERIMENT
from mpsearch.results.records import SearchResult, TrialRecord, speedup

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
LAYER_PREFIX = "layer."
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
CONNECT_TIMEOUT_S = 3.0


def _unreachable(uri: str) -> str | None:
    """Why an http(s) tracking server cannot be reached (None: it can, or the URI is not http)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as e:
        return f"cannot connect: {e.strerror or e}"


def _unwritable(uri: str) -> str | None:
    """Why an SQLite tracking store cannot be written (None: it can, or the URI is not an SQLite
    file). MLflow retries opening a database it cannot create for about two minutes; a probe file
    in its directory (what SQLite needs to write: the database and its journal) answers at once."""
    if not uri.startswith("sqlite:///"):
        return None
    name = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if name in ("", ":memory:") or name.startswith("file:"):
        return None
    path = Path(name)  # sqlite:///rel.db is relative to the working directory, sqlite:////abs.db absolute
    folder = path.parent
    if not folder.is_dir():
        return f"cannot write {path}: no directory {folder}"
    probe = folder / f".mpsearch-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as e:
        return f"cannot write to {folder}: {e.strerror or e}"
    if path.exists() and not os.access(path, os.W_OK):
        return f"cannot write {path}: {os.strerror(errno.EACCES)}"
    return None


def _reason(e: BaseException) -> str:
    """An MLflow error in a few words: the cause of a failed HTTP request ("cannot connect:
    Connection refused"), else the first sentence of its message."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    if "ConnectionPool" in text:  # urllib3's words, a few hundred characters of them
        cause = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
        return f"cannot connect: {cause.group(1).strip() if cause else 'the request failed'}"
    line = text.splitlines()[0]
    request = re.match(r"API request to \S+ failed with exception (.*)", line)
    if request:  # a server that went away mid-answer: ('Connection broken: ...', ...)
        quoted = re.search(r"'([^']+)'", request.group(1))
        line = f"request failed: {quoted.group(1) if quoted else request.group(1)}"
    first = line.split(". ", 1)[0].rstrip(".")
    if "MLFLOW_ALLOW_FILE_STORE" in text:  # MLflow 3's file store: say what works instead
        first += "; use a database store such as sqlite:///mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)"
    return first if len(first) <= 300 else first[:297] + "..."


def _text(v: Any) -> str:
    """A param value as text: true/false, numbers as Python writes them, lists comma-separated."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return ",".join(_text(x) for x in v)
    return str(v)


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Settings as flat MLflow params: nested dicts as `key.sub`, lists of scalars comma-separated
    (lists of lists as JSON), None left out."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if v is None:
            continue
        if isinstance(v, dict):
            out.update(flat_params(v, f"{key}."))
        elif isinstance(v, list | tuple) and any(isinstance(x, list | tuple | dict) for x in v):
            out[key] = json.dumps(v)
        else:
            out[key] = _text(v)
    return out


def layer_params(config, prefix: str = LAYER_PREFIX) -> dict[str, str]:
    """A configuration's per-layer precisions: `layer.<fqn>` -> "weight/activation"."""
    return {f"{prefix}{fqn}": f"{c.weight.value}/{c.activation.value}" for fqn, c in config.items()}


class Tracker:
    """Logs a search to MLflow. uri None: MLFLOW_TRACKING_URI, else MLflow's default store.

    `tracking`: what result.json says of it, {"mlflow_uri", "experiment", "run_id"}; a search
    makes it its result.tracking (pass one to keep up to date, as Tracker.resume does; run_id:
    the parent run to log more to). When the store fails the tracker goes off for good (`_off`):
    run_id becomes None, "off" says what failed and why, "incomplete_run_id" names the parent
    run it had started."""

    def __init__(self, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 tracking: dict[str, Any] | None = None, run_id: str | None = None):
        # MLflow retries a failed HTTP request 7 times with exponential backoff (minutes per call
        # against a server that is down); a search would rather go on without it (user settings win)
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri or mlflow.get_tracking_uri()
        self.experiment = experiment
        self.tracking = tracking if tracking is not None else {}
        self.tracking.update(mlflow_uri=self.uri, experiment=experiment)
        self.tracking.setdefault("run_id", None)
        self.enabled = True
        self.client = None
        self.parent_run_id: str | None = run_id
        self.experiment_id: str | None = None
        self.reference: dict[str, Any] = {}
        what = "connecting" if self.uri.startswith(("http://", "https://")) else "opening the store"
        down = _unreachable(self.uri) or _unwritable(self.uri)
        if down:
            self._off(what, down)
        else:  # MLflow refuses some stores here (file:// since MLflow 3: "maintenance mode")
            self.client = self._guard(what, MlflowClient, tracking_uri=self.uri)

    def _guard(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never lose a search
            self._off(what, _reason(e))
            return None

    def _off(self, what: str, why: str) -> None:
        """Stop tracking for good: one line on stderr, and `tracking` says it is off and why."""
        self.enabled = False
        verb = "stopped" if self.parent_run_id is not None else "failed"
        self.tracking.update(run_id=None, off=f"{verb} while {what}: {why}")
        if self.parent_run_id is not None:
            self.tracking["incomplete_run_id"] = self.parent_run_id
        print(f"mpsearch: MLflow tracking at {self.uri} {verb} while {what} ({why}); continuing without it, "
              "results are kept in result.json", file=sys.stderr)

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str],
              reference: dict[str, Any] | None = None) -> str | None:
        """The search's parent run: `params` flattened (flat_params), the FP32 `reference`
        (result.json's) as metrics."""
        self.reference = dict(reference or {})
        return self._guard("starting the search run", self._start, run_name, params, tags)

    def _start(self, run_name, params, tags):
        exp = self.client.get_experiment_by_name(self.experiment)
        key, kind = EXPERIMENT_KIND
        if exp is None:
            self.experiment_id = self.client.create_experiment(self.experiment, tags={key: kind})
        else:
            self.experiment_id = exp.experiment_id
            if key not in exp.tags:  # an experiment made before: MLflow 3 would open its GenAI view
                self.client.set_experiment_tag(self.experiment_id, key, kind)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_run_id = self.tracking["run_id"] = run.info.run_id
        self._log(self.parent_run_id, params=flat_params(params), metrics=self._reference_metrics())
        return self.parent_run_id

    @property
    def metric_name(self) -> str:
        return self.reference.get("metric_name") or "metric"

    def _reference_metrics(self) -> dict[str, float | None]:
        ref = self.reference
        return {"fp32_latency_ms": ref.get("fp32_latency_ms"), f"fp32_{self.metric_name}": ref.get("fp32_metric"),
                "int8_latency_ms": ref.get("int8_latency_ms"), f"int8_{self.metric_name}": ref.get("int8_metric")}

    def log_reference(self, reference: dict[str, Any]) -> None:
        """The references known after the trials (uniform int8's, mpsearch.engine.setup.int8_reference)
        as metrics of the parent run."""
        self.reference = dict(reference)
        if self.parent_run_id is not None:
            self._guard("logging the references", self._log, self.parent_run_id, metrics=self._reference_metrics())

    def _log(self, run_id: str, params=None, metrics=None, tags=None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v is not None]
        params = [Param(k, _text(v)) for k, v in (params or {}).items()]
        tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(metrics), len(params), len(tags), 1), 100):  # MLflow takes 100 params a batch
            self.client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100], tags=tags[i:i + 100])

    def log_trial(self, t: TrialRecord) -> None:
        self._guard(f"logging trial {t.number}", self._log_trial, t)

    def _log_trial(self, t: TrialRecord) -> None:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{t.number}",
            tags={"mlflow.parentRunId": self.parent_run_id, "mpsearch.trial": str(t.number)},
        )
        rid = run.info.run_id
        fp32_ms = self.reference.get("fp32_latency_ms")
        metrics = {
            self.metric_name: t.metric,
            "latency_ms": t.latency_ms if math.isfinite(t.latency_ms) else None,
            "speedup_fp32": speedup(fp32_ms, t.latency_ms),
            "weight_bytes": t.weight_bytes,
            "bops": t.bops,
            "peak_act_bytes": t.peak_act_bytes,
            "energy_mj": t.energy_mj,
            **t.proxies,
            **{f"{k if k != 'metric' else self.metric_name}_ci95_{end}": v for k, (lo, hi) in t.intervals.items()
               for end, v in (("low", lo), ("high", hi))},
            **self._reference_metrics(),
        }
        params = {
            "trial": t.number,
            "state": t.state,
            "feasible": t.feasible,
            "mean_weight_bits": round(t.mean_weight_bits, 4),
            "mean_activation_bits": round(t.mean_activation_bits, 4),
            **layer_params(t.config),
        }
        if t.duplicate_of is not None:
            params["duplicate_of"] = t.duplicate_of
        if t.reason:
            params["reason"] = t.reason[:500]
        self._log(rid, params=params, metrics=metrics)
        self.client.set_terminated(rid, "FAILED" if t.state == "fail" else "FINISHED")

    def log_files(self, paths, run_id: str | None = None) -> None:
        """Files as artifacts of the parent run (or of run_id)."""
        self._guard("logging artifacts", self._log_files, paths, run_id or self.parent_run_id)

    def _log_files(self, paths, run_id: str) -> None:
        for path in paths:
            self.client.log_artifact(run_id, str(path))

    def log_target(self, target: str, metrics: dict, params: dict, files=()) -> str | None:
        """A child run of the parent for one target of a compare."""
        return self._guard(f"logging target {target}", self._log_target, target, metrics, params, files)

    def _log_target(self, target, metrics, params, files) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"target-{target}",
                                     tags={"mlflow.parentRunId": self.parent_run_id, "mpsearch.target": target})
        self._log(run.info.run_id, params=params, metrics=metrics)
        for path in files:
            self.client.log_artifact(run.info.run_id, str(path))
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    @classmethod
    def resume(cls, tracking: dict) -> Tracker | None:
        """The tracker of a finished search (result.tracking), to log more to its parent run."""
        if not tracking.get("run_id"):  # never tracked, or tracking went off
            return None
        t = cls(tracking["mlflow_uri"], tracking["experiment"], tracking=tracking, run_id=tracking["run_id"])
        t.experiment_id = t._guard("finding the search run", lambda: t.client.get_run(t.parent_run_id).info.experiment_id)
        return t if t.enabled else None

    def finish(self, result: SearchResult, status: str = "FINISHED") -> None:
        self._guard("finishing the search run", self._finish, result, status)

    def _finish(self, result: SearchResult, status: str) -> None:
        best = result.best
        metrics = {"n_trials": len(result.trials), "pareto_size": len(result.pareto)}
        hv = result.hypervolume
        if hv is not None and hv["value"] == hv["value"]:  # not NaN
            metrics["hypervolume"] = hv["value"]
        metrics.update({f"time_{k}": v for k, v in result.timing.items()})
        tags = {}
        if best is not None:
            b = result.trial(best)
            metrics.update(best_metric=b.metric, best_latency_ms=b.latency_ms, best_weight_bytes=b.weight_bytes,
                           best_speedup_fp32=speedup(result.reference.get("fp32_latency_ms"), b.latency_ms),
                           **{f"best_{self.metric_name}": b.metric})
            tags = {"best.trial": str(b.number), **layer_params(b.config, f"best.{LAYER_PREFIX}")}
        self.reference = dict(result.reference)
        metrics.update(self._reference_metrics())
        self._log(self.parent_run_id, metrics=metrics, tags=tags)
        self.client.log_dict(self.parent_run_id, result.to_dict(), "result.json")
        self.client.set_terminated(self.parent_run_id, status)
