"""End-to-end: the CLI on the digits task with a real MLflow SQLite store, and bad input."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from mpsearch.cli import main
from mpsearch.engine.storage import make_storage
from mpsearch.results.records import SearchResult, pareto_front

REPO = Path(__file__).resolve().parents[2]


def cli(*argv: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mpsearch.cli", *argv], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_search_end_to_end_with_mlflow(tmp_path):
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = cli("search", "--task", "digits", "--target", "x86-vnni", "--trials", "6", "--seed", "3",
            "--out", str(out), "--mlflow-uri", uri, "--experiment", "e2e", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Pareto front: digits on x86-vnni" in p.stdout
    assert "search" in p.stderr  # the progress bar
    assert "Traceback" not in p.stderr

    d = json.loads((out / "result.json").read_text())
    assert d["schema"] == "mpsearch.result/1"
    assert d["task"] == "digits" and d["target"] == "x86-vnni"
    ref = d["reference"]
    assert ref["metric_name"] == "accuracy" and ref["fp32_metric"] > 0.9
    assert ref["fp32_latency_ms"] > 0 and ref["fp32_weight_bytes"] > 0
    assert len(d["trials"]) == 6
    layers = [x["fqn"] for x in d["space"]["layers"]]
    assert len(layers) == 8
    for t in d["trials"]:
        assert list(t["config"]) == layers
        assert t["state"] == "complete" and t["feasible"] and 0 <= t["metric"] <= 1
        assert set(t["config"][layers[0]]) == {"weight", "activation"}
    result = SearchResult.read(out / "result.json")
    assert d["pareto"] == pareto_front(result.trials) and d["pareto"]
    # best: the fastest complete trial within one standard error of FP32's accuracy on 360 samples
    p32, n = ref["fp32_metric"], ref["eval_samples"]
    assert n == 360 and d["settings"]["max_drop"] is None
    drop = math.sqrt(p32 * (1 - p32) / n)
    assert d["settings"]["drop_budget"]["points"] == pytest.approx(drop) and d["selection"]["within_drop"]
    within = [t for t in d["trials"] if t["state"] == "complete" and t["metric"] >= p32 - drop - 1e-9]
    best = min(within, key=lambda t: (t["latency_ms"], -t["metric"], t["number"]))
    assert d["best"] == best["number"] == result.best
    assert f"best: trial {best['number']}, accuracy {best['metric']:.4f}, {best['latency_ms']:.4g} ms (" in p.stdout
    assert (out / "study.log").exists()
    # what to do next, with this search's own paths
    steps = p.stdout[p.stdout.index("next steps:"):]
    assert f"mpsearch export {out} --out best.onnx" in steps
    assert f"mlflow ui --backend-store-uri {uri}" in steps
    assert f"optuna-dashboard {(out / 'study.log').resolve()}" in steps

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parent) == 1 and len(children) == 6
    assert parent[0].info.run_id == d["tracking"]["run_id"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent[0].info.run_id}
    by_trial = {int(c.data.params["trial"]): c for c in children}
    for t in d["trials"]:
        run = by_trial[t["number"]]
        assert run.data.metrics["accuracy"] == pytest.approx(t["metric"])  # the metric under its name
        assert run.data.metrics["speedup_fp32"] == pytest.approx(ref["fp32_latency_ms"] / t["latency_ms"])
        assert run.data.metrics["fp32_latency_ms"] == pytest.approx(ref["fp32_latency_ms"])
        assert run.data.metrics["latency_ms"] == pytest.approx(t["latency_ms"])
        assert run.data.metrics["weight_bytes"] == t["weight_bytes"]
        assert run.data.metrics["bops"] == t["bops"]
        bits = [int(c["weight"].removeprefix("int").removeprefix("fp")) for c in t["config"].values()]
        assert float(run.data.params["mean_weight_bits"]) == pytest.approx(sum(bits) / len(bits), abs=1e-4)
        layers_run = {k.removeprefix("layer."): v for k, v in run.data.params.items() if k.startswith("layer.")}
        assert layers_run == {f: f"{c['weight']}/{c['activation']}" for f, c in t["config"].items()}
    assert parent[0].data.metrics["n_trials"] == 6
    assert parent[0].data.metrics["best_latency_ms"] == pytest.approx(best["latency_ms"])
    assert parent[0].data.metrics["best_metric"] == pytest.approx(best["metric"])
    assert parent[0].data.metrics["best_accuracy"] == pytest.approx(best["metric"])
    assert parent[0].data.metrics["best_speedup_fp32"] == pytest.approx(ref["fp32_latency_ms"] / best["latency_ms"])
    assert parent[0].data.tags["best.trial"] == str(best["number"])
    assert {k: v for k, v in parent[0].data.tags.items() if k.startswith("best.layer.")} == {
        f"best.layer.{f}": f"{c['weight']}/{c['activation']}" for f, c in best["config"].items()}
    # flat typed params, one per option; options not given are not logged
    pp = parent[0].data.params
    assert pp["objectives"] == "metric,latency" and pp["task"] == "digits" and pp["n_trials"] == "6"
    assert "latency_budget_ms" not in pp and not any(v.startswith(("[", "{")) for v in pp.values())
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent[0].info.status == "FINISHED"


def test_api_is_reproducible_with_a_seed_and_respects_the_budget(tmp_path):
    import mpsearch

    a = mpsearch.search("digits", n_trials=8, seed=11, out_dir=tmp_path / "a", track=False, progress=False)
    b = mpsearch.search("digits", n_trials=8, seed=11, out_dir=tmp_path / "b", track=False, progress=False)
    assert [t.config for t in a.trials] == [t.config for t in b.trials]
    assert [t.metric for t in a.trials] == [t.metric for t in b.trials]

    fp32 = a.reference["fp32_latency_ms"]
    budget = (a.space["min_latency_ms"] + fp32) / 2
    # the sampler alone (a hybrid search under a budget proposes within it: mpsearch.engine.refine)
    c = mpsearch.search("digits", n_trials=10, seed=1, sampler="random", strategy="optuna", latency_budget_ms=budget,
                        out_dir=tmp_path / "c", track=False, progress=False)
    assert c.settings["latency_budget_ms"] == budget
    for t in c.trials:
        if t.latency_ms > budget:
            assert t.state == "infeasible" and not t.feasible and t.metric is None and "budget" in t.reason
        else:
            assert t.state == "complete" and t.feasible
    assert any(t.state == "infeasible" for t in c.trials)
    if c.best is not None:
        assert c.trial(c.best).latency_ms <= budget


def test_restricted_precisions(tmp_path):
    import mpsearch

    r = mpsearch.search("digits", n_trials=4, seed=0, weight_precisions="int4,int8", activation_precisions="int8",
                        out_dir=tmp_path, track=False, progress=False)
    for t in r.trials:
        assert {c.weight.value for c in t.config.values()} <= {"int4", "int8"}
        assert {c.activation.value for c in t.config.values()} == {"int8"}
    assert r.space["size"] == 2**8


STAGE_LINE = re.compile(r"mpsearch: [^:]+(: done in [0-9.]+ s| \.\.\.)$")  # progress of a slow stage


def one_line_error(rc, err, *needles):
    assert rc == 2
    lines = [x for x in err.splitlines() if x.strip() and not STAGE_LINE.match(x)]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("mpsearch: error: "), lines[0]  # one prefix, subcommands included
    for n in needles:
        assert n in lines[0], lines[0]


BAD_TASK = """
def build():
    raise ValueError("dataset shard 7 is missing")
"""


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["search", "--task", "nosuchtask"], ["nosuchtask", "digits", "mobilenet_v2"]),
        (["search", "--task", "digits", "--target", "tpu-v9"], ["tpu-v9", "x86-vnni"]),
        (["search", "--task", "a:b:c"], ["a:b:c"]),
        (["search", "--task", "digits", "--trials", "0"], ["--trials"]),
        (["search", "--task", "digits", "--trials", "-3"], ["--trials"]),
        (["search", "--task", "digits", "--sampler", "cmaes"], ["cmaes", "tpe"]),
        (["search", "--task", "digits", "--sensitivity", "hessian"], ["--sensitivity", "hessian", "fisher", "exact"]),
        (["search", "--task", "digits", "--weight-precisions", "int5"], ["int5"]),
        (["search", "--task", "digits", "--latency-budget", "1e-9", "--no-mlflow"], ["cheapest", "ms"]),
        (["search", "--task", "digits", "--latency-budget", "inf"], ["--latency-budget", "finite", "inf"]),
        (["search", "--task", "digits", "--latency-budget", "nan"], ["--latency-budget", "finite", "nan"]),
        (["compare", "--task", "digits", "--targets", "x86-vnni,h100", "--latency-budget", "inf"],
         ["--latency-budget", "finite"]),
        (["search", "--task", "digits", "--target", "/nonexistent/cpu.toml"], ["/nonexistent/cpu.toml", "no such"]),
        (["profile", "--task", "digits", "--precision", "int5"], ["int5"]),
        (["profile", "--task", "digits", "--config", "/nonexistent/c.json"], ["/nonexistent/c.json"]),
        (["search", "--task", "digits", "--max-drop", "lots"], ["--max-drop", "'lots'", "1%"]),
        (["search", "--task", "digits", "--max-drop", "150%"], ["--max-drop", "at most 100%"]),
        (["search", "--task", "digits", "--max-drop", "-0.1"], ["--max-drop", "at least 0"]),
        (["search", "--task", "digits", "--weight-granularity", "per_row", "--no-mlflow"],
         ["--weight-granularity 'per_row' is not one of per_channel, per_tensor"]),
        (["search", "--task", "digits", "--act-percentile", "20", "--no-mlflow"], ["--act-percentile", "(50, 100]"]),
        (["export", "/nonexistent/dir", "--out", "c.json"], ["/nonexistent/dir", "no such file"]),
        (["search", "--task", "digits", "--bogus"], ["--bogus", "--help"]),
    ],
)
def test_bad_input_one_line_exit_2(capsys, argv, needles):
    rc, _out, err = run_main(capsys, *argv)
    one_line_error(rc, err, *needles)


def test_task_function_that_raises(tmp_path, capsys):
    f = tmp_path / "bad_task.py"
    f.write_text(BAD_TASK)
    rc, _out, err = run_main(capsys, "search", "--task", f"{f}:build", "--no-mlflow")
    one_line_error(rc, err, "raised ValueError", "dataset shard 7 is missing")


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    rc, _out, err = run_main(capsys, "search", "--task", "digits", "--trials", "1", "--no-mlflow",
                            "--out", str(blocker / "sub"))
    one_line_error(rc, err, "output directory", str(blocker / "sub"))


def test_bad_input_from_a_real_process_has_no_traceback():
    p = cli("search", "--task", "nosuchtask")
    one_line_error(p.returncode, p.stderr, "nosuchtask")


def test_tasks_and_targets_commands(capsys):
    rc, out, _ = run_main(capsys, "tasks")
    assert rc == 0 and "digits" in out and "mobilenet_v2" in out and "minilm" in out
    rc, out, _ = run_main(capsys, "targets")
    assert rc == 0 and "int8" in out
    for name in ("x86-vnni", "arm-a76", "h100", "jetson-orin", "cortex-m7", "bitfusion"):
        assert f"\n{name} " in "\n" + out


def test_profile_command_prints_every_layer_and_totals(capsys, tmp_path):
    rc, out, _ = run_main(capsys, "profile", "--task", "digits", "--precision", "int4/int8")
    assert rc == 0
    rows = [ln for ln in out.splitlines() if ln.startswith(("features.", "classifier."))]
    assert len(rows) == 8 and all("int4/int8" in r and "int8" in r for r in rows)
    # the deployed graph converts once: the input to int8 (the last layer's QGemm writes float)
    assert "total: latency" in out and "1 conversion 0." in out and "where the deployed graph has them" in out
    # a config file: one layer missing is refused, naming it; a full one is priced
    import json

    cfg = {f"features.{i}": {"weight": "int8", "activation": "int8"} for i in (0, 2, 4, 6, 8, 10)}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    rc, _, err = run_main(capsys, "profile", "--task", "digits", "--config", str(tmp_path / "c.json"))
    one_line_error(rc, err, "classifier.1")
    cfg |= {f"classifier.{i}": {"weight": "fp32", "activation": "fp32"} for i in (1, 3)}
    (tmp_path / "c.json").write_text(json.dumps({"config": cfg}))
    rc, out, _ = run_main(capsys, "profile", "--task", "digits", "--config", str(tmp_path / "c.json"),
                          "--target", "cortex-m7")
    assert rc == 0 and "cortex-m7" in out and "fp32/fp32" in out


def test_ctrl_c_keeps_finished_trials(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpsearch.cli", "search", "--task", "digits", "--trials", "500",
         "--out", str(out), "--no-mlflow", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    result = out / "result.json"
    deadline = time.time() + 180
    n = 0
    while time.time() < deadline and proc.poll() is None:
        if result.exists():
            n = len(json.loads(result.read_text())["trials"])
            if n >= 3:
                break
        time.sleep(0.2)
    assert n >= 3, "search made no progress"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "kept in" in err
    d = json.loads(result.read_text())
    assert d["interrupted"] is True and len(d["trials"]) >= n
    study = optuna.load_study(study_name=d["settings"]["study_name"], storage=make_storage(d["settings"]["storage"]))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == len(d["trials"])
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)
    assert os.path.exists(out / "study.log")


def test_version_is_the_package_version():
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    p = cli("--version")
    assert p.returncode == 0 and p.stdout == f"mpsearch {version}\n"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_flag_has_help_and_its_default_comes_from_the_code(monkeypatch):
    from mpsearch import cli as cli_module
    from mpsearch import defaults
    from mpsearch.calibration.cpu import calibrate
    from mpsearch.scoring.evaluator import QuantSettings

    parser = cli_module.build_parser()
    assert all(a.help for a in parser._actions)
    helps = {}
    for name, sub in _subparsers(parser).items():
        for a in sub._actions:
            assert a.help and a.help != argparse.SUPPRESS, (name, a.option_strings or a.dest)
        helps[name] = " ".join(sub.format_help().split())
        assert "{default}" not in helps[name] and "{choices}" not in helps[name] and "see the Python API" not in \
            helps[name], name
    search = helps["search"]
    q = QuantSettings()
    assert f"per_channel, per_tensor (default {q.weight_granularity})" in search
    assert f"(default {q.act_percentile})" in search and f"(default {q.act_range})" in search
    assert f"journal file {defaults.STUDY_FILE} in the output directory" in search and "sqlite in" not in search
    assert f"(default {defaults.DEFAULT_TRIALS}; with --resume" in search
    assert "(default metric,bops)" in helps["compare"] and "(default metric,latency)" in search
    sig = inspect.signature(calibrate).parameters
    assert f"(default {sig['n_mixed'].default})" in helps["calibrate"]
    assert f"(default {sig['seed'].default})" in helps["calibrate"]
    # the defaults are read from mpsearch.defaults, not retyped: change one, the flag and its help follow
    monkeypatch.setattr(defaults, "DEFAULT_TRIALS", 77)
    parser = cli_module.build_parser()
    assert parser.parse_args(["search", "--task", "digits"]).trials == 77
    assert "(default 77;" in " ".join(_subparsers(parser)["search"].format_help().split())
    # quantizer and calibration flags left out are left to the API's own defaults
    args = parser.parse_args(["search", "--task", "digits", "--act-range", "mse"])
    assert cli_module._quant(args) == QuantSettings(act_range="mse")


def test_rate_is_per_second_or_seconds_per_trial():
    from mpsearch.report.text import trial_rate

    assert trial_rate(10, 2.0) == "5.0 a second"
    assert trial_rate(3, 7.5) == "2.5 s a trial"  # not "0.4 a second", and never "0.0 a second"
    assert trial_rate(1, 300.0) == "300.0 s a trial"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished digits search (the API, no MLflow) with a 1% drop budget."""
    import mpsearch

    out = tmp_path_factory.mktemp("finished")
    r = mpsearch.search("digits", n_trials=6, seed=2, strategy="optuna", max_drop="1%", out_dir=out, track=False,
                        progress=False)
    return out, r


def test_max_drop_in_percent_reaches_result_json(finished):
    out, r = finished
    d = json.loads((out / "result.json").read_text())
    fp32 = d["reference"]["fp32_metric"]
    assert d["settings"]["max_drop"] == "1%"
    assert d["settings"]["drop_budget"]["points"] == pytest.approx(0.01 * fp32)
    assert d["settings"]["drop_budget"]["source"] == "given: 1% of the FP32 accuracy"
    within = [t for t in d["trials"] if t["state"] == "complete" and t["metric"] >= 0.99 * fp32 - 1e-9]
    expected = (min(within, key=lambda t: (t["latency_ms"], -t["metric"], t["number"])) if within else
                max(d["trials"], key=lambda t: (t["metric"], -t["latency_ms"], -t["number"])))
    assert d["best"] == r.best == expected["number"]
    assert json.loads((out / "best_config.json").read_text())["trial"] == d["best"]


def test_export_format_follows_the_extension(finished, tmp_path):
    pytest.importorskip("onnx")
    out, r = finished
    p = cli("export", str(out), "--out", str(tmp_path / "best.onnx"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "best.onnx").read_bytes()[:1] != b"{"  # a protobuf, not JSON
    import onnx

    assert onnx.load(str(tmp_path / "best.onnx")).graph.node
    assert f"trial {r.best} of digits as its deployed ONNX QDQ graph" in p.stdout
    p = cli("export", str(out), "--out", str(tmp_path / "best.json"))
    assert p.returncode == 0 and json.loads((tmp_path / "best.json").read_text())["trial"] == r.best
    p = cli("export", str(out), "--out", str(tmp_path / "x.cfg"), "--format", "json")  # unknown extension, told
    assert p.returncode == 0 and json.loads((tmp_path / "x.cfg").read_text())["trial"] == r.best


@pytest.mark.parametrize("argv, needles", [
    (["--out", "x.onnx", "--format", "json"], ["--format json contradicts --out x.onnx", "onnx"]),
    (["--out", "x.json", "--format", "onnx"], ["--format onnx contradicts --out x.json"]),
    (["--out", "x.cfg"], ["cannot tell the format of --out x.cfg", "FILE.json or FILE.onnx", "--format"]),
    (["--out", "/nonexistent/dir/x.json"], ["No such file or directory", "/nonexistent/dir/x.json"]),
])
def test_export_refuses_a_format_its_file_contradicts(finished, tmp_path, capsys, monkeypatch, argv, needles):
    out, _ = finished
    monkeypatch.chdir(tmp_path)
    rc, _out, err = run_main(capsys, "export", str(out), *argv)
    one_line_error(rc, err, *needles)
    assert not any(tmp_path.iterdir())  # nothing written


def test_without_a_browser_the_pngs_are_skipped_in_one_line_after_the_summary(tmp_path):
    """kaleido draws the PNGs in Chrome/Chromium: with none (BROWSER_PATH names a missing one),
    the search still succeeds, its summary and HTML report written, and says so in one line."""
    out = tmp_path / "out"
    env = {**os.environ, "BROWSER_PATH": str(tmp_path / "no-such-chrome")}
    p = cli("search", "--task", "digits", "--trials", "3", "--strategy", "optuna", "--out", str(out), "--no-mlflow",
            "--no-progress", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.index("Pareto front") < p.stdout.index("next steps:")
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("mpsearch: PNG plots skipped: ") and "Chromium" in lines[0], lines
    assert (out / "result.json").exists() and (out / "report.html").exists() and not list(out.glob("*.png"))
    rc = subprocess.run([sys.executable, "-m", "mpsearch.cli", "report", str(out)], env=env, capture_output=True,
                        text=True, timeout=120, check=False)
    assert rc.returncode == 0 and rc.stdout.split() == [str(out / "report.html")]
    assert rc.stderr.count("\n") == 1 and "PNG plots skipped" in rc.stderr


def test_slow_stages_say_what_they_do_and_quick_ones_stay_quiet(tmp_path, capsys, monkeypatch):
    import mpsearch
    from mpsearch.engine import setup

    monkeypatch.setattr(setup, "STAGE_QUIET_S", 0.0)  # every stage counts as slow
    mpsearch.search("digits", n_trials=1, strategy="optuna", out_dir=tmp_path / "a", track=False, progress=True)
    err = capsys.readouterr().err
    stages = [ln for ln in err.splitlines() if STAGE_LINE.match(ln)]
    assert stages[0] == "mpsearch: loading task digits ..."
    assert re.fullmatch(r"mpsearch: loading task digits: done in [0-9]+\.[0-9] s", stages[1])
    assert stages[2] == ("mpsearch: preparing the evaluator (activation ranges on 4 calibration batches, FP32 outputs "
                         "on 3 evaluation batches; kept in the evaluator cache) ...")
    assert re.fullmatch(r"mpsearch: preparing the evaluator: done in [0-9]+\.[0-9] s", stages[3])
    monkeypatch.setattr(setup, "STAGE_QUIET_S", 60.0)  # quick stages say nothing, and --no-progress nothing at all
    with setup.stage(True, "a quick stage"):
        pass
    with setup.stage(False, "anything"):
        pass
    assert capsys.readouterr().err == ""


def test_a_profile_name_from_a_file_never_leaves_the_output_root(tmp_path):
    """A --target TOML naming itself "../../../x/ESCAPED" once wrote its results outside
    mpsearch-out/: the name is only a name (slashes become underscores)."""
    from hw_models import get_profile
    from hw_models.profile_file import dump_profile

    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    text = dump_profile(get_profile("x86-vnni")).replace('name = "x86-vnni"', 'name = "../../../x/ESCAPED"', 1)
    assert 'name = "../../../x/ESCAPED"' in text
    (work / "evil.toml").write_text(text)
    p = cli("search", "--task", "digits", "--target", "evil.toml", "--trials", "2", "--strategy", "optuna",
            "--no-mlflow", "--no-progress", cwd=work)
    assert p.returncode == 0, p.stderr
    (out,) = (work / "mpsearch-out").iterdir()
    assert out.name.startswith("digits-.._.._.._x_ESCAPED-") and (out / "result.json").exists()
    assert not (tmp_path / "x").exists() and not (work.parent / "x").exists()
    assert sorted(p.name for p in tmp_path.rglob("result.json")) == ["result.json"]


@pytest.mark.parametrize("bad", [math.inf, math.nan, -1.0, 0, True, "fast"])
def test_api_refuses_a_budget_that_is_not_a_positive_finite_number(bad, tmp_path):
    import mpsearch
    from mpsearch.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError, match="finite"):
        mpsearch.search("digits", latency_budget_ms=bad, out_dir=tmp_path / "s")
    with pytest.raises(InvalidConfigError, match="finite"):
        mpsearch.search("digits", size_budget_mb=bad, out_dir=tmp_path / "s")
    with pytest.raises(InvalidConfigError, match="finite"):
        mpsearch.compare("digits", ["x86-vnni", "h100"], 2, latency_budget_ms=bad, out_dir=tmp_path / "c")
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()  # refused before any work


def test_mpsearch_compare_is_the_function_beside_the_results_compare_module():
    code = ("import mpsearch, mpsearch.results.compare, mpsearch.api\n"
            "from mpsearch.results.compare import Comparison\n"
            "print(callable(mpsearch.compare), mpsearch.compare is mpsearch.api.compare, Comparison.__name__)")
    r = subprocess.run([sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=120, check=True)
    assert r.stdout.split() == ["True", "True", "Comparison"]


EXITING_TASKS = {
    "build": "import sys\ndef build():\n    sys.exit(0)\n",
    "metric": ("import dataclasses, sys\nfrom mpsearch.tasks.digits import build as digits\n"
               "def quit_metric(outputs, targets):\n    sys.exit(0)\n"
               "def build():\n    return dataclasses.replace(digits(), metric_fn=quit_metric)\n"),
}


@pytest.mark.parametrize("where", sorted(EXITING_TASKS))
def test_a_task_calling_sys_exit_is_a_task_error_not_a_silent_success(where, tmp_path):
    """sys.exit(0) in a task's build or metric once ended the run with rc 0 and nothing said."""
    f = tmp_path / "quits.py"
    f.write_text(EXITING_TASKS[where])
    p = cli("search", "--task", f"{f}:build", "--trials", "2", "--no-mlflow", "--no-progress",
            "--out", str(tmp_path / "out"), cwd=tmp_path)
    one_line_error(p.returncode, p.stderr, "SystemExit")
