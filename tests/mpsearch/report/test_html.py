"""The report (Plotly figures as one offline HTML page and as PNGs), checked in headless Chromium;
MLflow tracking of a compare read back from a real `mlflow server`; the Optuna study read back
from a real `optuna-dashboard` server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpsearch.cli import main
from mpsearch.results.records import SearchResult

CLI = [sys.executable, "-m", "mpsearch.cli"]
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, free_port, mlflow_server_factory):
    with mlflow_server_factory(tmp_path_factory.mktemp("mlflow"), free_port()) as (uri, _):
        yield uri


@pytest.fixture(scope="module")
def compared(mlflow_server, tmp_path_factory):
    """A compare of digits on three targets, tracked on the real server (the CLI: PNGs included
    where there is a browser)."""
    out = tmp_path_factory.mktemp("cmp") / "out"
    p = subprocess.run([*CLI, "compare", "--task", "digits", "--targets", "x86-vnni,h100,bitfusion", "--trials", "8",
                        "--strategy", "optuna", "--out", str(out), "--mlflow-uri", mlflow_server,
                        "--experiment", "cmp", "--no-progress"], capture_output=True, text=True, timeout=600,
                       check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A search of digits from the CLI, its study in OUT/study.log."""
    out = tmp_path_factory.mktemp("search") / "out"
    p = subprocess.run([*CLI, "search", "--task", "digits", "--trials", "10", "--seed", "2", "--out", str(out),
                        "--no-mlflow", "--no-progress"], capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def _layer_text(config: dict) -> dict[str, str]:
    return {fqn: f"{c['weight']}/{c['activation']}" for fqn, c in config.items()}


def test_compare_logs_runs_metrics_and_artifacts_to_a_real_server(mlflow_server, compared, browser_path, tmp_path):
    from mlflow.tracking import MlflowClient

    out, _ = compared
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("cmp")
    # MLflow 3 opens an experiment of this kind in its classic runs view, not the GenAI one
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], max_results=100)
    result = SearchResult.read(out / "result.json")
    parent_id = result.tracking["run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    targets = {r.data.tags.get("mpsearch.target") for r in children if r.info.run_name.startswith("target-")}
    assert targets == {"x86-vnni", "h100", "bitfusion"}
    trials = {int(r.data.params["trial"]): r for r in children if r.info.run_name.startswith("trial-")}
    assert len(trials) == 8
    h100 = next(r for r in children if r.info.run_name == "target-h100")
    cmp = json.loads((out / "compare.json").read_text())
    table = cmp["per_target"]["h100"]
    assert h100.data.metrics["pareto_size"] == len(table["pareto"])
    assert h100.data.metrics["fp32_latency_ms"] == pytest.approx(table["reference"]["fp32_latency_ms"])
    hb = table["best"]
    assert h100.data.metrics["best_trial"] == hb
    assert h100.data.metrics["best_speedup_fp32"] == pytest.approx(
        table["reference"]["fp32_latency_ms"] / table["trials"][str(hb)]["latency_ms"])
    # each trial: the metric under its name, the FP32 reference and the speed-up over it as
    # metrics, its per-layer precisions as flat `layer.<fqn>` params (queryable)
    ref = result.reference
    for t in result.trials:
        run = trials[t.number].data
        assert run.metrics["accuracy"] == pytest.approx(t.metric)
        assert run.metrics["fp32_latency_ms"] == pytest.approx(ref["fp32_latency_ms"])
        assert run.metrics["speedup_fp32"] == pytest.approx(ref["fp32_latency_ms"] / t.latency_ms)
        assert {k.removeprefix("layer."): v for k, v in run.params.items() if k.startswith("layer.")} == \
            _layer_text(t.config.to_dict())
    some = result.trials[0]
    fqn, choice = next(iter(_layer_text(some.config.to_dict()).items()))
    found = client.search_runs([exp.experiment_id], f"params.`layer.{fqn}` = '{choice}'", max_results=100)
    assert {int(r.data.params["trial"]) for r in found} == {
        t.number for t in result.trials if _layer_text(t.config.to_dict())[fqn] == choice}
    # the parent: flat typed params (one per option and quantizer setting, none a Python repr),
    # the references and the best's speed-up as metrics, the best's layers as tags
    parent = client.get_run(parent_id)
    pp = parent.data.params
    assert pp["objectives"] == "metric,bops" and pp["task"] == "digits" and pp["n_trials"] == "8"
    assert not any(v.startswith(("[", "{", "None")) or v == "None" for v in pp.values()), pp
    assert any(k.startswith("quant.") for k in pp) and "latency_budget_ms" not in pp
    assert not any(k.startswith("options.") for k in pp)  # result.json's settings.options: the same again
    pm = parent.data.metrics
    assert pm["n_trials"] == 8
    assert pm["fp32_accuracy"] == pytest.approx(ref["fp32_metric"])
    assert pm["int8_latency_ms"] == pytest.approx(ref["int8_latency_ms"])
    best = result.trial(result.best)
    assert pm["best_speedup_fp32"] == pytest.approx(ref["fp32_latency_ms"] / best.latency_ms)
    assert {k.removeprefix("best.layer."): v for k, v in parent.data.tags.items() if k.startswith("best.layer.")} \
        == _layer_text(best.config.to_dict())
    names = {a.path for a in client.list_artifacts(parent_id)}
    pngs = {"pareto.png", "precision_map.png", "latency_breakdown.png", "history.png"}
    assert {"result.json", "report.html", "compare.json", "best_config.json"} <= names
    if browser_path:  # kaleido draws the PNGs in Chromium
        assert pngs <= names
    else:
        assert not pngs & names
    local = client.download_artifacts(parent_id, "best_config.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == json.loads((out / "best_config.json").read_text())


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


def _traces(fig, name: str, xaxis: str = "x") -> list:
    return [t for t in fig.data if t.name == name and (t.xaxis or "x") == xaxis]


def test_report_figures_are_drawn_from_result_json(searched, capsys):
    """Every view's numbers are result.json's: one point per scored trial, the front, the best,
    FP32 and uniform int8 where they are, hover speed-ups, precisions, per-layer latencies."""
    import plotly.offline

    from mpsearch.report.html import figures, report_data

    out, _ = searched
    result = SearchResult.read(out / "result.json")
    ref = result.reference
    figs = figures(report_data(result, None))
    assert set(figs) == {"pareto", "precision_map", "latency_breakdown", "history"}  # not verified: no such view
    pareto = figs["pareto"]
    scored = {t.number: t for t in result.trials if t.state == "complete" and t.feasible}
    drawn = [(x, y) for name in ("scored trial", "Pareto front") for t in _traces(pareto, name) for x, y in zip(t.x, t.y)]
    assert sorted(drawn) == sorted((t.latency_ms, t.metric) for t in scored.values())
    (front,) = _traces(pareto, "Pareto front")
    assert list(front.x) == sorted(scored[n].latency_ms for n in result.pareto)
    (best,) = _traces(pareto, "best (deploy this)")
    b = result.trial(result.best)
    assert (best.x[0], best.y[0]) == (b.latency_ms, b.metric)
    assert f"{ref['fp32_latency_ms'] / b.latency_ms:.2f}x over FP32" in best.text[0] and f"trial {b.number}" in best.text[0]
    (fp32,) = _traces(pareto, "FP32")
    assert (fp32.x[0], fp32.y[0]) == (ref["fp32_latency_ms"], ref["fp32_metric"])
    (int8,) = _traces(pareto, "uniform int8")
    assert (int8.x[0], int8.y[0]) == (ref["int8_latency_ms"], ref["int8_metric"])
    # precisions: a row per front configuration, fastest first; weights then activations
    weights, acts = figs["precision_map"].data
    assert len(weights.z) == len(result.pareto)
    for row, n in zip(weights.text, sorted(result.pareto, key=lambda n: scored[n].latency_ms), strict=True):
        short = {"fp32": "f32", "fp16": "f16"}
        assert list(row) == [short.get(c.weight.value, c.weight.value.removeprefix("int"))
                             for c in result.trial(n).config.values()]
    assert list(weights.x) == list(b.config) and len(acts.z) == len(result.pareto)
    # per-layer latency of the best: a bar per layer, compute and conversion summing to its latency
    compute, conversion = figs["latency_breakdown"].data
    assert len(compute.x) == len(b.config) and compute.x[0].startswith(next(iter(b.config)))
    assert (sum(compute.y) + sum(conversion.y)) / 1e3 == pytest.approx(b.latency_ms)
    # history: the metric of every scored trial in trial order
    hist = [(x, y) for t in figs["history"].data if t.mode == "markers" and (t.yaxis or "y") == "y"
            for x, y in zip(t.x, t.y)]
    assert sorted(hist) == sorted((t.number, t.metric) for t in result.trials if t.state in ("complete", "pruned"))

    (out / "report.html").unlink()
    assert main(["report", str(out), "--no-png"]) == 0
    assert capsys.readouterr().out.split() == [str(out / "report.html")]
    page = (out / "report.html").read_text()
    assert page.count(plotly.offline.get_plotlyjs()[:2000]) == 1  # plotly.js once, inline
    assert page.count("Plotly.newPlot(") == len(figs)
    rows = re.findall(r"<tr>(.*?)</tr>", page.split('id="trials"')[1].split("</table>")[0], re.DOTALL)
    assert len(rows) == len(result.trials) + 1
    cells = [re.findall(r"<td>(.*?)</td>", r) for r in rows[1:]]
    assert {int(c[0]) for c in cells if c[10] == "yes"} == set(result.pareto)  # the Pareto column
    assert [int(c[0]) for c in cells if c[11] == "yes"] == [result.best]
    assert all(c[6] == f"{ref['fp32_latency_ms'] / scored[int(c[0])].latency_ms:.2f}x" for c in cells
               if int(c[0]) in scored)
    for c in cells:  # the metric's 95% confidence interval and the KL to FP32 with its own
        t = result.trial(int(c[0]))
        if t.state == "complete":
            lo, hi = t.intervals["metric"]
            assert c[3] == f"{lo:.4f}-{hi:.4f}" and lo <= t.metric <= hi
            klo, khi = t.intervals["kl_to_fp32"]
            assert c[4] == f"{t.proxies['kl_to_fp32']:.3g} ({klo:.3g}-{khi:.3g})"
    rc = main(["report", str(out.parent / "nothing")])
    err = capsys.readouterr().err
    assert rc == 2 and "no result.json" in err


def test_report_writes_its_figures_as_pngs_1400_px_wide(searched, browser, tmp_path, capsys):
    from PIL import Image

    from mpsearch.report.html import WIDTH, figures, report_data

    out, _ = searched
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "result.json").write_bytes((out / "result.json").read_bytes())
    assert main(["report", str(copy)]) == 0
    written = [Path(w) for w in capsys.readouterr().out.split()]
    figs = figures(report_data(SearchResult.read(copy / "result.json"), None))
    assert [w.name for w in written] == ["report.html", *(f"{k}.png" for k in figs)]
    for k, fig in figs.items():
        with Image.open(copy / f"{k}.png") as im:
            assert im.size == (WIDTH, fig.layout.height)
            assert len(np.unique(np.asarray(im.convert("L")))) > 20  # drawn, not a blank canvas


def test_reports_open_in_headless_chromium_without_errors(searched, compared, browser, tmp_path):
    """tools/check_report.py: no console error, no network request, no empty plot, a hover with
    the trial and its speed-up, a sortable table; screenshots at 1400 px."""
    from PIL import Image

    shots = tmp_path / "shots"
    p = subprocess.run([sys.executable, str(REPO / "tools" / "check_report.py"), str(searched[0] / "report.html"),
                        str(compared[0] / "report.html"), "--screenshots", str(shots), "--names", "search,compare"],
                       capture_output=True, text=True, timeout=300, check=False, env={**os.environ,
                                                                                     "MPSEARCH_CHROMIUM": browser})
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("\n  ok\n") + p.stdout.endswith("  ok\n") >= 2 and "FAIL" not in p.stdout
    for view in ("plot-pareto", "plot-precision_map", "plot-latency_breakdown", "plot-history"):
        assert p.stdout.count(f"  {view}: ") == 2
    for name in ("search", "compare"):
        with Image.open(shots / f"{name}.png") as im:
            assert im.size[0] == 1400 and im.size[1] > 2000


def test_the_browser_check_fails_on_a_request_an_error_and_an_empty_plot(searched, browser, tmp_path):
    page = (searched[0] / "report.html").read_text()
    bad = tmp_path / "bad" / "report.html"
    bad.parent.mkdir()
    bad.write_text(page.replace("</body>", '<img src="http://127.0.0.1:9/x.png"><script>console.error("boom")</script>'
                                '<div id="plot-empty" class="plotly-graph-div"></div>'
                                "<script>Plotly.newPlot('plot-empty', [])</script></body>"))
    p = subprocess.run([sys.executable, str(REPO / "tools" / "check_report.py"), str(bad)], capture_output=True,
                       text=True, timeout=300, check=False, env={**os.environ, "MPSEARCH_CHROMIUM": browser})
    assert p.returncode == 1, p.stdout + p.stderr
    fails = [ln for ln in p.stdout.splitlines() if "FAIL " in ln]
    assert any("network request: http://127.0.0.1:9/x.png" in f for f in fails)
    assert any("console error: boom" in f for f in fails)
    assert any("plot-empty rendered empty" in f for f in fails)
    # nothing else (the blocked image's failed load is a console error of its own)
    assert all(("boom" in f or "127.0.0.1:9" in f or "plot-empty" in f or "ERR_FAILED" in f) for f in fails), fails


def test_the_study_reads_well_in_a_real_optuna_dashboard(searched, free_port):
    """optuna-dashboard on the search's study.log: objectives named, each trial's record as user
    attributes a dashboard shows (one per field, not one JSON blob)."""
    import urllib.request

    out, _ = searched
    result = SearchResult.read(out / "result.json")
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("optuna-dashboard")), str(out / "study.log"),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline, studies = time.time() + 60, None
        while studies is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.loads(r.read())["study_summaries"]
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        (study,) = studies
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}", timeout=30) as r:
            detail = json.loads(r.read())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert detail["objective_names"] == ["accuracy", "latency_ms"]
    by_number = {t["number"]: {a["key"]: a["value"] for a in t["user_attrs"]} for t in detail["trials"]}
    for t in result.trials:
        attrs = by_number[t.number]
        assert attrs["state"] == t.state and float(attrs["latency_ms"]) == pytest.approx(t.latency_ms)
        assert float(attrs["speedup_fp32"]) == pytest.approx(result.reference["fp32_latency_ms"] / t.latency_ms)
        assert float(attrs["mean_weight_bits"]) == pytest.approx(t.mean_weight_bits, abs=1e-4)
        if t.state == "complete":
            assert float(attrs["metric"]) == pytest.approx(t.metric)
        assert "mpsearch.record" not in attrs and not any(str(v).startswith("{") for v in attrs.values())


def test_no_private_optuna_module_is_imported():
    private = re.compile(r"^\s*(from|import)\s+optuna(\.\w+)*\._|optuna(\.\w+)*\._\w+\(")
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
            for p in (REPO / "mpsearch").rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if private.search(line)]
    assert not hits, hits


@pytest.mark.parametrize("text, message", [
    ("{", "not a readable compare.json"),
    ('{"targets": ["x86-vnni"], "per_target": {}}', "not a compare.json of mpsearch"),
])
def test_report_refuses_a_broken_compare_json_in_one_line(tmp_path, capsys, text, message):
    from hw_models import Candidate, Precision
    from mpsearch.results.records import TrialRecord

    cfg = Candidate.uniform(["l1"], Precision.INT8, Precision.INT8)
    ref = {"metric_name": "accuracy", "fp32_metric": 1.0, "fp32_latency_ms": 2.0, "fp32_weight_bytes": 400}
    SearchResult("digits", "x86-vnni", ref, [TrialRecord(0, "complete", cfg, 0.9, 1.0, 100, 1000, True)]).write(
        tmp_path / "result.json")
    (tmp_path / "compare.json").write_text(text)
    rc = main(["report", str(tmp_path), "--no-png"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err and "compare.json" in err
    assert not (tmp_path / "report.html").exists()


def test_names_are_drawn_as_text_never_as_markup_or_math(browser, tmp_path):
    """Layer, task and metric names from a model are text in every view: no LaTeX ($...$, which
    broke matplotlib's PNGs once), no HTML; the page still checks clean in Chromium."""
    from hw_models import Candidate, Precision
    from mpsearch.results.records import TrialRecord

    names = ["$\\frac{x$", "<b>bold</b>", "a&b"]
    ref = {"metric_name": "$acc$", "fp32_metric": 1.0, "fp32_latency_ms": 2.0, "fp32_weight_bytes": 400}
    result = SearchResult("$task$", "x86-vnni", ref, [
        TrialRecord(0, "complete", Candidate.uniform(names, Precision.INT8, Precision.INT8), 0.9, 1.0, 100, 1000, True),
        TrialRecord(1, "complete", Candidate.uniform(names, Precision.INT4, Precision.INT8), 0.8, 0.5, 50, 500, True)])
    result.settings["breakdown"] = [{"fqn": n, "latency_us": 3.0, "transition_us": 1.0, "compute": "int8",
                                     "bound": "compute", "precision": "int8/int8"} for n in names]
    out = tmp_path / "hostile"
    out.mkdir()
    result.write(out / "result.json")
    assert main(["report", str(out)]) == 0
    assert {p.name for p in out.glob("*.png")} == {"pareto.png", "precision_map.png", "latency_breakdown.png",
                                                    "history.png"}
    p = subprocess.run([sys.executable, str(REPO / "tools" / "check_report.py"), str(out / "report.html")],
                       capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "MPSEARCH_CHROMIUM": browser})
    assert p.returncode == 0, p.stdout + p.stderr
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=browser, args=["--no-sandbox"])
        page = b.new_page()
        page.goto((out / "report.html").as_uri())
        page.wait_for_selector("#plot-precision_map .xaxislayer-above text")
        ticks = page.eval_on_selector_all("#plot-precision_map .xaxislayer-above text", "ts => ts.map(t => t.textContent)")
        bold = page.eval_on_selector_all("#plot-precision_map .xaxislayer-above text tspan[style*='bold']", "ts => ts.length")
        b.close()
    assert ticks == names and bold == 0
