"""The report (HTML + PNGs) and MLflow tracking of a compare against a real `mlflow server`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpsearch.cli import main
from mpsearch.result import SearchResult

CLI = [sys.executable, "-m", "mpsearch.cli"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, free_port):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
        proc.wait(timeout=60)
        log.close()


def test_compare_logs_runs_metrics_and_artifacts_to_a_real_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    p = subprocess.run([*CLI, "compare", "--task", "digits", "--targets", "x86-vnni,h100,bitfusion", "--trials", "8",
                        "--strategy", "optuna", "--out", str(out), "--mlflow-uri", mlflow_server,
                        "--experiment", "cmp", "--no-progress"], capture_output=True, text=True, timeout=600,
                       check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("cmp")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent_id = SearchResult.read(out / "result.json").tracking["run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    targets = {r.data.tags.get("mpsearch.target") for r in children if r.info.run_name.startswith("target-")}
    assert targets == {"x86-vnni", "h100", "bitfusion"}
    assert sum(r.info.run_name.startswith("trial-") for r in children) == 8
    h100 = next(r for r in children if r.info.run_name == "target-h100")
    table = json.loads((out / "compare.json").read_text())["per_target"]["h100"]
    assert h100.data.metrics["pareto_size"] == len(table["pareto"])
    assert h100.data.metrics["fp32_latency_ms"] == pytest.approx(table["reference"]["fp32_latency_ms"])
    names = {a.path for a in client.list_artifacts(parent_id)}
    assert {"result.json", "report.html", "compare.json", "pareto.png", "history.png", "best_config.json"} <= names
    local = client.download_artifacts(parent_id, "best_config.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == json.loads((out / "best_config.json").read_text())
    parent = client.get_run(parent_id)
    assert parent.data.metrics["n_trials"] == 8


def test_unreachable_server_keeps_everything_locally_and_says_so_once(tmp_path, free_port):
    out = tmp_path / "out"
    t0 = time.time()
    p = subprocess.run([*CLI, "search", "--task", "digits", "--trials", "4", "--strategy", "optuna", "--out", str(out),
                        "--mlflow-uri", f"http://127.0.0.1:{free_port()}", "--no-progress"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert time.time() - t0 < 120  # no minutes of retries
    lines = [ln for ln in p.stderr.splitlines() if "MLflow" in ln]
    assert len(lines) == 1 and "continuing without it" in lines[0]
    assert len(SearchResult.read(out / "result.json").trials) == 4 and (out / "report.html").exists()


def test_report_rebuilds_html_and_pngs_from_result_json(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["search", "--task", "digits", "--trials", "6", "--strategy", "optuna", "--out", str(out),
                 "--no-mlflow", "--no-progress"]) == 0
    result = SearchResult.read(out / "result.json")
    (out / "report.html").unlink()
    for png in out.glob("*.png"):
        png.unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert {Path(w).name for w in written} == {"report.html", "pareto.png", "precision_map.png",
                                               "latency_breakdown.png", "history.png"}
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    scored = [t for t in result.trials if t.state == "complete"]
    # one dot per scored trial in the front plot and in the history
    assert page.count("<circle") == 2 * len(scored)
    front_rows = re.findall(r'<table class="map">(.*?)</table>', page, re.DOTALL)[0].count("<tr>") - 1
    assert front_rows == len(result.pareto)
    assert len(re.findall(r"<rect ", page)) >= len(result.trial(result.best).config)  # a bar per layer
    assert all(p.stat().st_size > 1000 for p in out.glob("*.png"))
    rc = main(["report", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert rc == 2 and "no result.json" in err


@pytest.mark.parametrize("text, message", [
    ("{", "not a readable compare.json"),
    ('{"targets": ["x86-vnni"], "per_target": {}}', "not a compare.json of mpsearch"),
])
def test_report_refuses_a_broken_compare_json_in_one_line(tmp_path, capsys, text, message):
    from hw_models import Candidate, Precision
    from mpsearch.result import TrialRecord

    cfg = Candidate.uniform(["l1"], Precision.INT8, Precision.INT8)
    ref = {"metric_name": "accuracy", "fp32_metric": 1.0, "fp32_latency_ms": 2.0, "fp32_weight_bytes": 400}
    SearchResult("digits", "x86-vnni", ref, [TrialRecord(0, "complete", cfg, 0.9, 1.0, 100, 1000, True)]).write(
        tmp_path / "result.json")
    (tmp_path / "compare.json").write_text(text)
    rc = main(["report", str(tmp_path), "--no-png"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err and "compare.json" in err
    assert not (tmp_path / "report.html").exists()
