"""MLflow tracking from the driver: one parent run per search, one child run per trial.

Uses MlflowClient with explicit run ids (nesting through the `mlflow.parentRunId` tag), so it
never touches MLflow's global active-run state. If the tracking store fails, the search goes
on: the tracker says so in one line on stderr and stops logging; result.json keeps everything.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from mpsearch.result import SearchResult, TrialRecord

DEFAULT_EXPERIMENT = "mpsearch"


class Tracker:
    """Logs a search to MLflow. uri None: MLFLOW_TRACKING_URI, else MLflow's default store."""

    def __init__(self, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri or mlflow.get_tracking_uri()
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=self.uri)
        self.enabled = True
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None

    def _guard(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never lose a search
            self.enabled = False
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(
                f"mpsearch: MLflow tracking at {self.uri} failed while {what} ({first}); "
                "continuing without it, results are kept in result.json",
                file=sys.stderr,
            )
            return None

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        return self._guard("starting the search run", self._start, run_name, params, tags)

    def _start(self, run_name, params, tags):
        exp = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_run_id = run.info.run_id
        self._log(self.parent_run_id, params=params)
        return self.parent_run_id

    def _log(self, run_id: str, params=None, metrics=None, tags=None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v is not None],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_trial(self, t: TrialRecord) -> None:
        self._guard(f"logging trial {t.number}", self._log_trial, t)

    def _log_trial(self, t: TrialRecord) -> None:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{t.number}",
            tags={"mlflow.parentRunId": self.parent_run_id, "mpsearch.trial": str(t.number)},
        )
        rid = run.info.run_id
        metrics = {
            "latency_ms": t.latency_ms,
            "weight_bytes": t.weight_bytes,
            "bops": t.bops,
            "peak_act_bytes": t.peak_act_bytes,
            "metric": t.metric,
            **t.proxies,
        }
        params = {
            "trial": t.number,
            "state": t.state,
            "feasible": t.feasible,
            "mean_weight_bits": round(t.mean_weight_bits, 4),
            "mean_activation_bits": round(t.mean_activation_bits, 4),
        }
        if t.reason:
            params["reason"] = t.reason[:500]
        self._log(rid, params=params, metrics=metrics)
        self.client.log_dict(rid, t.config.to_dict(), "config.json")
        self.client.set_terminated(rid, "FAILED" if t.state == "fail" else "FINISHED")

    def finish(self, result: SearchResult, status: str = "FINISHED") -> None:
        self._guard("finishing the search run", self._finish, result, status)

    def _finish(self, result: SearchResult, status: str) -> None:
        best = result.best
        metrics = {"n_trials": len(result.trials), "pareto_size": len(result.pareto)}
        hv = result.hypervolume
        if hv is not None and hv["value"] == hv["value"]:  # not NaN
            metrics["hypervolume"] = hv["value"]
        metrics.update({f"time_{k}": v for k, v in result.timing.items()})
        if best is not None:
            b = result.trial(best)
            metrics.update(best_metric=b.metric, best_latency_ms=b.latency_ms, best_weight_bytes=b.weight_bytes)
        self._log(self.parent_run_id, metrics=metrics)
        self.client.log_dict(self.parent_run_id, result.to_dict(), "result.json")
        self.client.set_terminated(self.parent_run_id, status)
