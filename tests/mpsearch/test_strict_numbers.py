"""Numbers that break the arithmetic (issue 19).

- a hardware profile whose figures are outside physical bounds (1e308, 1e-300) is refused at load
  in one line naming the file, the field, the value and the allowed range (it crashed the ILP with
  an OverflowError, or gave infinite latencies and a NaN hypervolume);
- every JSON file mpsearch writes is strict JSON (no NaN / Infinity tokens: null instead);
- a hand-edited result.json whose trial records have the wrong types is refused in one line
  naming the file, the trial and the field (it crashed `mpsearch export` with a TypeError).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mpsearch
from hw_models import Candidate, LayerChoice, LayerSpec, Precision, get_profile
from hw_models.profile_file import dump_profile
from mpsearch.deploy.export import CONFIG_SCHEMA, write_config
from mpsearch.engine.sensitivity import _read_cache, _write_cache
from mpsearch.errors import InvalidConfigError
from mpsearch.results.compare import Comparison, price_on_targets
from mpsearch.results.records import SearchResult, TrialRecord

P = Precision
I8, F32, F16 = LayerChoice(P.INT8, P.INT8), LayerChoice(P.FP32, P.FP32), LayerChoice(P.FP16, P.FP16)


def cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpsearch.cli", *argv], capture_output=True, text=True, timeout=600,
                          check=False, cwd=cwd)


def strict_loads(text: str):
    """json.loads refusing the NaN / Infinity / -Infinity tokens Python's json accepts."""

    def refuse(token: str):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


# -- 1. profile figures outside physical bounds ----------------------------------------------------
def _profile_file(tmp_path: Path, old: str, new: str) -> Path:
    text = dump_profile(get_profile("x86-vnni"))
    assert old in text
    path = tmp_path / "extreme.toml"
    path.write_text(text.replace(old, new, 1))
    return path


EXTREMES = [
    ("layer_overhead_s = 1e-06", "layer_overhead_s = 1e308",
     "field layer_overhead_s: 1e+308 is outside the allowed range [0, 10] s"),
    ("mem_bw_bytes_per_s = 20000000000.0", "mem_bw_bytes_per_s = 1e-300",
     "field mem_bw_bytes_per_s: 1e-300 is outside the allowed range [1e3, 1e15] B/s"),
]


@pytest.mark.parametrize(("old", "new", "message"), EXTREMES)
def test_cli_refuses_a_profile_figure_outside_its_bounds_in_one_line(tmp_path, old, new, message):
    path = _profile_file(tmp_path, old, new)
    p = cli("search", "--task", "digits", "--target", str(path), "--trials", "2", "--no-progress", "--no-mlflow",
            "--out", str(tmp_path / "out"), cwd=tmp_path)
    line = one_line_error(p)
    assert line == f"mpsearch: error: {path}: {message}"
    assert not (tmp_path / "out" / "result.json").exists()


@pytest.mark.parametrize(("old", "new", "message"), EXTREMES)
def test_api_refuses_a_profile_figure_outside_its_bounds_with_a_typed_error(tmp_path, old, new, message):
    path = _profile_file(tmp_path, old, new)
    with pytest.raises(InvalidConfigError) as e:
        mpsearch.search("digits", target=str(path), n_trials=2, out_dir=tmp_path / "s", progress=False,
                        track=False)
    assert str(e.value) == f"{path}: {message}"
    with pytest.raises(InvalidConfigError, match=re.escape(message)):
        mpsearch.compare("digits", ["h100", str(path)], 2, out_dir=tmp_path / "c", track=False)
    assert not (tmp_path / "s" / "result.json").exists() and not (tmp_path / "c" / "result.json").exists()



def test_api_refuses_a_profile_object_outside_the_bounds_too(tmp_path):
    import dataclasses

    profile = dataclasses.replace(get_profile("x86-vnni"), name="slipped", mem_bw_bytes_per_s=20.0)  # GB/s as B/s
    with pytest.raises(InvalidConfigError) as e:
        mpsearch.search("digits", target=profile, n_trials=2, out_dir=tmp_path / "s", progress=False, track=False)
    assert str(e.value) == "profile slipped: field mem_bw_bytes_per_s: 20.0 is outside the allowed range [1e3, 1e15] B/s"
    assert not (tmp_path / "s").exists()


# -- 2. strict JSON ---------------------------------------------------------------------------------
REF = {"metric_name": "accuracy", "fp32_metric": 1.0, "fp32_latency_ms": 2.0, "fp32_weight_bytes": 400}


def _trials() -> list[TrialRecord]:
    a = Candidate([("l1", I8), ("l2", I8)])
    b = Candidate([("l1", F32), ("l2", I8)])
    c = Candidate([("l1", F16), ("l2", I8)])
    return [
        TrialRecord(0, "complete", a, 0.9, 1.0, 100, 1000, True, proxies={"sqnr_db": 30.0, "kl_to_fp32": 0.01}),
        # the FP32-exact configuration: its SQNR is infinite
        TrialRecord(1, "complete", b, 0.95, 2.0, 300, 3000, True, proxies={"sqnr_db": math.inf, "kl_to_fp32": 0.0}),
        # a pair the target cannot run: priced at an infinite latency
        TrialRecord(2, "infeasible", c, None, math.inf, 200, 2000, False, reason="cannot run l1 at fp16/fp16"),
    ]


def test_result_json_is_strict_json_and_round_trips(tmp_path):
    # a finite reference point first: the hypervolume by hand, in (-metric, latency) with reference (0, 4):
    # front (-0.9, 1.0) and (-0.95, 2.0): 0.9 x 3 + 0.05 x 2 = 2.8
    r = SearchResult("digits", "x86-vnni", REF, _trials(), settings={"hv_reference": {"metric": 0.0, "latency": 4.0}})
    assert r.pareto == [0, 1] and r.hypervolume["value"] == pytest.approx(2.8)
    path = tmp_path / "result.json"
    r.write(path)
    d = strict_loads(path.read_text())
    assert d["hypervolume"]["value"] == pytest.approx(2.8)
    assert d["trials"][2]["latency_ms"] is None and d["trials"][1]["proxies"]["sqnr_db"] is None
    assert d["trials"][0]["latency_ms"] == 1.0 and d["trials"][0]["proxies"]["sqnr_db"] == 30.0

    # an infinite reference cost (a profile pricing every layer at infinity): a NaN hypervolume
    r.settings["hv_reference"] = {"metric": 0.0, "latency": math.inf}
    assert math.isnan(r.hypervolume["value"])
    memo: dict = {}
    for m in (None, memo, memo):  # fresh, memoized, from the memo
        r.write(path, m)
        d = strict_loads(path.read_text())
        assert d["hypervolume"]["value"] is None and d["settings"]["hv_reference"]["latency"] is None
        assert d["trials"][2]["latency_ms"] is None and d["trials"][1]["proxies"]["sqnr_db"] is None
    back = SearchResult.read(path)
    assert back.trials[2].latency_ms == math.inf  # null latency: never priced finitely, as written
    assert back.trials[1].proxies == {"sqnr_db": None, "kl_to_fp32": 0.0}
    assert [t.config for t in back.trials] == [t.config for t in r.trials]
    assert back.pareto == [0, 1] and back.best == r.best
    assert math.isnan(back.hypervolume["value"])
    text = path.read_text()
    back.write(path)
    assert path.read_text() == text


def test_compare_json_is_strict_json_and_round_trips(tmp_path):
    layers = [LayerSpec("l1", "linear", (64, 64), 1, 4096, 64, 64), LayerSpec("l2", "linear", (10, 64), 1, 640, 64, 10)]
    result = SearchResult("digits", "x86-vnni", REF, _trials())
    cmp = price_on_targets(result, layers, [get_profile("x86-vnni"), get_profile("h100")])
    # x86-vnni cannot run fp16: trial 2 is priced at an infinite latency there
    assert cmp.per_target["x86-vnni"]["trials"][2]["latency_ms"] == math.inf
    result.write(tmp_path / "result.json")
    cmp.write(tmp_path / "compare.json")
    d = strict_loads((tmp_path / "compare.json").read_text())
    assert d["per_target"]["x86-vnni"]["trials"]["2"]["latency_ms"] is None
    assert d["per_target"]["h100"]["trials"]["2"]["latency_ms"] > 0
    back = Comparison.read(tmp_path)
    assert back.per_target["x86-vnni"]["trials"][2]["latency_ms"] == math.inf
    assert back.per_target["x86-vnni"]["pareto"] == cmp.per_target["x86-vnni"]["pareto"]
    assert back.view("x86-vnni").pareto == cmp.view("x86-vnni").pareto


def test_exported_configuration_is_strict_json(tmp_path):
    config = {"schema": CONFIG_SCHEMA, "task": "digits", "trial": 3, "metric": math.nan, "latency_ms": math.inf,
              "layers": {"l1": {"weight": "int8", "activation": "int8"}}}
    write_config(config, tmp_path / "best.json")
    d = strict_loads((tmp_path / "best.json").read_text())
    assert d["metric"] is None and d["latency_ms"] is None and d["trial"] == 3


def test_sensitivity_cache_is_strict_json_and_a_non_finite_value_is_measured_again(tmp_path):
    path = tmp_path / "sensitivity-x.json"
    _write_cache(path, "kl_to_fp32", 3, {"l1": {I8: math.inf, LayerChoice(P.INT4, P.INT8): 0.5}, "l2": {I8: 0.25}})
    d = strict_loads(path.read_text())
    assert d["values"]["l1"] == {"int8/int8": None, "int4/int8": 0.5}
    assert _read_cache(path, "kl_to_fp32", 3) == {"l1": {LayerChoice(P.INT4, P.INT8): 0.5}, "l2": {I8: 0.25}}


# -- 3. result.json records of the wrong type ---------------------------------------------------
@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    """A real 3-trial search on digits (about 10 s)."""
    work = tmp_path_factory.mktemp("search")
    p = cli("search", "--task", "digits", "--trials", "3", "--seed", "0", "--no-progress", "--no-mlflow",
            "--out", str(work / "out"), cwd=work)
    assert p.returncode == 0, p.stderr
    return work / "out"


def test_a_real_search_writes_strict_json(searched):
    d = strict_loads((searched / "result.json").read_text())
    assert len(d["trials"]) == 3 and all(t["state"] == "complete" for t in d["trials"])


def _edited(searched: Path, tmp_path: Path, trial: int, field: str, value) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(searched, out)
    d = json.loads((out / "result.json").read_text())
    d["trials"][trial][field] = value
    (out / "result.json").write_text(json.dumps(d, indent=1))
    return out


@pytest.mark.parametrize(("trial", "field", "value", "needle"), [
    (0, "metric", None, "trial 0: metric: a complete trial needs a finite number, found None"),
    (2, "metric", "0.98", "trial 2: metric: expected a number or null, found '0.98'"),
    (1, "latency_ms", "fast", "trial 1: latency_ms: expected a number or null, found 'fast'"),
    (1, "state", "done", "trial 1: state: 'done' is not one of complete, infeasible, pruned, fail"),
])
def test_export_refuses_a_hand_edited_result_json_in_one_line(searched, tmp_path, trial, field, value, needle):
    out = _edited(searched, tmp_path, trial, field, value)
    line = one_line_error(cli("export", str(out), "--out", "best.json", cwd=tmp_path))
    assert line == f"mpsearch: error: {out / 'result.json'}: {needle}"
    assert not (tmp_path / "best.json").exists()


def test_export_of_the_unedited_search_works(searched, tmp_path):
    p = cli("export", str(searched), "--out", "best.json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    d = strict_loads((tmp_path / "best.json").read_text())
    assert d["schema"] == CONFIG_SCHEMA and math.isfinite(d["metric"])


# -- the bounds admit every profile the calibrations produce -----------------------------------
def test_the_calibrations_fit_within_the_profile_bounds(tmp_path):
    """The recorded H100 measurements' fit (what `mpsearch calibrate --target h100` writes) is within
    the bounds and loads back; and every grid the fits choose from is (so any calibration is)."""
    import dataclasses

    from hw_models.profile_file import load_profile
    from hw_models.profiles import FIGURE_BOUNDS, H100
    from mpsearch.calibration import cpu as calibrate
    from mpsearch.calibration import fit
    from mpsearch.calibration import gpu as gpu_calibrate
    d = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "h100-2026-11-28.json").read_text())
    ms = [gpu_calibrate.Measurement(gpu_calibrate.Gemm(p["name"], p["m"], p["k"], p["n"]), p["kind"], p["measured_s"],
                                    p["mode"]) for p in d["products"]]
    eff, overhead, bandwidth, _ = gpu_calibrate.fit_profile(H100, ms, d["copy_bandwidth_Bps"])
    fitted = dataclasses.replace(H100, name="h100-fitted", efficiency={**H100.efficiency, **eff},
                                 layer_overhead_s=overhead, mem_bw_bytes_per_s=bandwidth)
    assert fitted.bound_problems() == []
    (tmp_path / "h.toml").write_text(dump_profile(fitted))
    assert load_profile(tmp_path / "h.toml") == fitted

    lo, hi, _ = FIGURE_BOUNDS["efficiency"]
    assert lo <= fit.EFFICIENCY_GRID.min() and fit.EFFICIENCY_GRID.max() <= hi
    for grid in (calibrate.OVERHEAD_GRID, gpu_calibrate.OVERHEAD_GRID):
        assert FIGURE_BOUNDS["layer_overhead_s"][0] <= grid.min() and grid.max() <= FIGURE_BOUNDS["layer_overhead_s"][1]
    # the fitted bandwidth is the measured copy bandwidth times a scale: up to 2x a 5e14 B/s copy
    assert gpu_calibrate.BANDWIDTH_SCALES.max() * 5e14 <= FIGURE_BOUNDS["mem_bw_bytes_per_s"][1]


def test_allocation_totals_that_overflow_are_a_typed_error():
    """A profile built in code is not bounded (only finite): per-layer latencies of 1e308 s once
    crashed the ILP with an OverflowError (math.fsum) through the whole search."""
    from mpsearch.engine.ilp import min_total, solve_allocation, sweep

    i4 = LayerChoice(P.INT4, P.INT8)
    options = {"l1": [I8, i4], "l2": [I8, i4]}
    costs = {f: {I8: {"latency_s": 1e308}, i4: {"latency_s": 1.5e308}} for f in options}
    sens = {f: {I8: 0.0, i4: 1.0} for f in options}
    with pytest.raises(InvalidConfigError, match="^the latency_s total of an allocation overflows a float"):
        min_total(options, costs, "latency_s")
    with pytest.raises(InvalidConfigError, match="latency_s total"):
        sweep(options, sens, costs, "latency_s", 3)
    with pytest.raises(InvalidConfigError, match="latency_s total"):
        solve_allocation(options, sens, costs, {"latency_s": math.inf})
    # tied layers sum their costs when the problem is built
    with pytest.raises(InvalidConfigError, match="latency_s total"):
        solve_allocation(options, sens, costs, {"latency_s": 1.0}, ties=[["l1", "l2"]])
