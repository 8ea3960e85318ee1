"""The search controller on digits: strategies, objectives, budgets, space reduction, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import optuna
import pytest

import mpsearch
from hw_models import ExecRule, LayerChoice, Precision, get_profile, weight_bytes
from mpsearch.api import profile_config
from mpsearch.cli import main
from mpsearch.engine.storage import make_storage
from mpsearch.errors import BudgetError, InvalidConfigError
from mpsearch.results.objectives import hypervolume, pareto_front
from mpsearch.scoring.analysis import analyze
from mpsearch.tasks import load_task

P = Precision
W8A8 = LayerChoice(P.INT8, P.INT8)
LAYERS = ("features.0", "features.2", "features.4", "features.6", "features.8", "features.10",
          "classifier.1", "classifier.3")
# a space of 2^3 = 8: int4 or int8 weights for three layers, the other five pinned at int8/int8
SMALL = {"weight_precisions": "int4,int8", "activation_precisions": "int8",
         "pins": dict.fromkeys(LAYERS[:5], "int8/int8")}


def run(tmp_path, name, **kw):
    kw = {"track": False, "progress": False, "out_dir": tmp_path / name, **kw}
    return mpsearch.search("digits", **kw)


def test_exhaustive_scores_every_candidate_once_and_bounds_every_other_front(tmp_path):
    ex = run(tmp_path, "ex", strategy="exhaustive", n_trials=1, **SMALL)
    assert ex.space["size"] == 8 and round(ex.space["log10_size_unreduced"], 3) == round(8 * 0.30103, 3)
    assert len(ex.trials) == 8 and len({t.config for t in ex.trials}) == 8
    assert all(t.state == "complete" for t in ex.trials)
    for t in ex.trials:
        assert all(t.config[f] == W8A8 for f in LAYERS[:5])
    # the exact front: brute force over the 8 scored trials
    pts = {t.number: (-t.metric, t.latency_ms) for t in ex.trials}
    brute = {n for n, p in pts.items()
             if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts.values())}
    assert set(ex.pareto) <= brute and {pts[n] for n in ex.pareto} == {pts[n] for n in brute}
    hv = ex.hypervolume
    assert hv["value"] > 0 and hv["reference"]["metric"] == 0.0
    assert hv["reference"]["latency"] >= max(t.latency_ms for t in ex.trials)
    # any other search of the same space reaches at most the exact hypervolume
    rnd = run(tmp_path, "rnd", strategy="optuna", sampler="random", n_trials=5, seed=1, **SMALL)
    assert rnd.hypervolume["reference"] == hv["reference"]
    assert rnd.hypervolume["value"] <= hv["value"] + 1e-12

    with pytest.raises(InvalidConfigError, match=r"space has 256 candidates .* exhaustive limit of 100"):
        run(tmp_path, "big", strategy="exhaustive", weight_precisions="int4,int8", activation_precisions="int8",
            exhaustive_limit=100)


def test_hybrid_starts_from_ilp_solutions_then_samples(tmp_path):
    r = run(tmp_path, "hy", strategy="hybrid", n_trials=12, n_seeds=4, seed=0,
            weight_precisions="int2,int4,int8", activation_precisions="int8")
    n, first = r.settings["ilp_solutions"], int(r.settings["uniform_int8_seed"])
    assert 2 <= n <= 4 and len(r.trials) == 12
    t = r.timing
    assert t["sensitivity_s"] >= 0 and t["ilp_s"] >= 0 and t["scoring_s"] > 0 and t["sampler_s"] > 0
    # uniform int8 is tried among the seeds: first, unless an ILP solution is that already
    int8 = [x.number for x in r.trials[: first + n] if all(c.weight == P.INT8 for c in x.config.values())
            and all(c.activation == P.INT8 for f, c in x.config.items() if f != LAYERS[0])]
    assert int8 == [0] if first else len(int8) == 1
    # the ILP solutions sweep latency: the seeds are ordered by their additive latency
    seeds = [x.config for x in r.trials[first : first + n]]
    assert len(set(seeds)) == n
    assert all(x.state in ("complete", "infeasible") for x in r.trials[:n])
    ilp = run(tmp_path, "ilp", strategy="ilp", n_trials=4, seed=0,
              weight_precisions="int2,int4,int8", activation_precisions="int8")
    assert [x.config for x in ilp.trials] == seeds  # same sweep, same order: the ilp strategy alone
    assert ilp.settings["sensitivity_measure"] == "kl_to_fp32"
    # estimated (or read from the user cache, where another search of digits put them)
    assert {r.settings["sensitivity_path"], ilp.settings["sensitivity_path"]} <= {"fisher", "cache"}
    exact = run(tmp_path, "exact", strategy="ilp", n_trials=4, seed=0, sensitivity="exact", evaluator_cache=False,
                weight_precisions="int2,int4,int8", activation_precisions="int8")
    assert exact.settings["sensitivity_path"] == "suffix"  # measured, not estimated
    fisher = run(tmp_path, "fisher", strategy="ilp", n_trials=2, seed=0, evaluator_cache=False,
                 weight_precisions="int2,int4,int8", activation_precisions="int8")
    assert fisher.settings["sensitivity_path"] == "fisher"  # the default: estimated


def test_objectives_budgets_and_constraints(tmp_path):
    r = run(tmp_path, "mo", strategy="optuna", sampler="nsga2", n_trials=10, seed=2,
            objectives="metric,weight_memory,bops", size_budget_mb=0.05)
    study = optuna.load_study(study_name=r.settings["study_name"], storage=make_storage(r.settings["storage"]))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    for t, ft in zip(r.trials, study.trials, strict=True):
        over = ft.constraints["size_over_budget_mb"]
        assert over == pytest.approx((t.weight_bytes - 50_000) / 1e6)
        if t.weight_bytes > 50_000:
            assert t.state == "infeasible" and t.metric is None and "size budget" in t.reason
            assert ft.values[0] < -1  # told below any real accuracy
        else:
            assert t.state == "complete" and ft.values == [t.metric, t.weight_bytes, t.bops]
    front = pareto_front(r.trials, ("metric", "weight_memory", "bops"))
    assert r.pareto == front and front
    # 3-D hypervolume, computed by hand from the front and the stored reference point
    ref = r.hypervolume["reference"]
    pts = [(-r.trial(n).metric, r.trial(n).weight_bytes, r.trial(n).bops) for n in front]
    assert r.hypervolume["value"] == pytest.approx(
        hypervolume(pts, (-ref["metric"], ref["weight_memory"], ref["bops"])))

    # a target that runs int4 weights unpacked to fp32 (slow, small) and int8 natively (fast, larger):
    # the fastest configuration (all int8) and the smallest (all int4) differ, so the two
    # budgets below can each be met but not together
    x86 = get_profile("x86-vnni")
    odd = dataclasses.replace(x86, name="odd", rules=(ExecRule(P.INT8, P.INT8, "int8", True),
                                                      ExecRule(P.INT4, P.INT8, "fp32", False)))
    space = {"weight_precisions": "int4,int8", "activation_precisions": "int8"}
    fast = run(tmp_path, "fast", target=odd, strategy="optuna", n_trials=1, **space)
    small = sum(weight_bytes(x, P.INT4) for x in analyze(load_task("digits").model,
                                                         load_task("digits").example_input).layers)
    kw = {"target": odd, "strategy": "optuna", "n_trials": 1, **space}
    run(tmp_path, "lat", latency_budget_ms=fast.space["min_latency_ms"] * 1.001, **kw)  # alone: fine
    run(tmp_path, "size", size_budget_mb=small * 1.001 / 1e6, **kw)
    with pytest.raises(BudgetError, match="together"):
        run(tmp_path, "both", latency_budget_ms=fast.space["min_latency_ms"] * 1.001,
            size_budget_mb=small * 1.001 / 1e6, **kw)
    with pytest.raises(BudgetError, match="below the smallest weights"):
        run(tmp_path, "tiny", size_budget_mb=small * 0.9 / 1e6, **kw)


def test_hypervolume_by_hand():
    # 2-D staircase: strips 1x1 + 1x2 + 1x3
    assert hypervolume([(1, 3), (2, 2), (3, 1), (3.5, 3.5)], (4, 4)) == 6.0
    # 3-D: two boxes [1,4]x[1,4]x[2,4] (18) and [2,4]x[2,4]x[1,4] (12) overlapping in [2,4]^2x[2,4] (8)
    assert hypervolume([(1, 1, 2), (2, 2, 1)], (4, 4, 4)) == pytest.approx(18 + 12 - 8)
    assert hypervolume([(5, 1)], (4, 4)) == 0.0


# Point sets (numpy default_rng(7) integers) and the hypervolumes the hand-written 2-D sweep and
# Optuna's WFG gave before mpsearch.results.objectives moved to moocore: the same values, exactly
HV_SETS = [
    ([[18, 12], [13, 17], [11, 15], [16, 4], [1, 6], [5, 17], [18, 0], [9, 16], [2, 15], [2, 9], [16, 6], [6, 5],
      [14, 5], [19, 8], [9, 10], [11, 11], [10, 19], [16, 15], [14, 12], [6, 19], [9, 4], [16, 3], [17, 12], [2, 0],
      [8, 0], [2, 10], [19, 9], [16, 18], [16, 12], [8, 10]], (20, 20), 374.0),
    ([[2, 4, 3], [2, 9, 0], [0, 1, 9], [6, 8, 2], [7, 3, 4], [0, 6, 8], [6, 1, 5], [2, 9, 8], [1, 5, 9], [8, 7, 6],
      [0, 7, 4], [0, 2, 5], [7, 5, 6], [8, 6, 3], [6, 5, 1], [0, 6, 3], [5, 3, 2], [1, 3, 8], [4, 3, 5], [9, 3, 5],
      [4, 6, 4], [6, 5, 6], [9, 1, 5], [4, 3, 2], [0, 4, 8]], (10, 10, 10), 626.0),
    ([[0, 2, 5, 5], [1, 0, 4, 0], [1, 2, 5, 0], [3, 3, 0, 5], [5, 2, 5, 3], [5, 5, 3, 1], [0, 3, 1, 4], [5, 1, 3, 0],
      [1, 2, 5, 5], [3, 3, 3, 0], [2, 5, 2, 1], [1, 4, 0, 5], [5, 3, 2, 4], [3, 2, 1, 2], [4, 0, 0, 4]],
     (6, 6, 6, 6), 659.0),
]


@pytest.mark.parametrize("points, ref, expected", HV_SETS)
def test_hypervolume_and_front_as_before(points, ref, expected):
    import itertools

    assert hypervolume(points, ref) == expected
    # the front by definition, pair by pair: the same as moocore's filter
    records = [SimpleNamespace(number=i, state="complete", feasible=True, duplicate_of=None, metric=-p[0],
                               latency_ms=p[1], weight_bytes=p[2] if len(p) > 2 else 0,
                               bops=p[3] if len(p) > 3 else 0) for i, p in enumerate(points)]
    names = ("metric", "latency", "weight_memory", "bops")[:len(ref)]
    dominated = {j for i, j in itertools.permutations(range(len(points)), 2)
                 if all(a <= b for a, b in zip(points[i], points[j], strict=True))
                 and (points[i] != points[j] or i < j)}
    front = pareto_front(records, names)
    assert sorted(front) == sorted(set(range(len(points))) - dominated)
    # the hypervolume of the front alone is the whole set's
    assert hypervolume([points[i] for i in front], ref) == expected


SAMPLER_CLASSES = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
                   "nsga3": optuna.samplers.NSGAIIISampler, "random": optuna.samplers.RandomSampler,
                   "qmc": optuna.samplers.QMCSampler, "gp": optuna.samplers.GPSampler}


@pytest.mark.parametrize("sampler", sorted(SAMPLER_CLASSES))
def test_each_sampler_name_makes_that_sampler(sampler):
    from mpsearch.engine.loop import make_sampler

    made = make_sampler(sampler, 0, 400)
    assert type(made) is SAMPLER_CLASSES[sampler]
    if sampler.startswith("nsga"):  # population n_trials / 4 within [10, 50]
        assert [make_sampler(sampler, 0, n)._population_size for n in (8, 120, 400)] == [10, 30, 50]


@pytest.mark.parametrize("sampler", ["nsga3", "qmc", "gp"])
def test_other_samplers_run(tmp_path, sampler):
    r = run(tmp_path, sampler, strategy="optuna", sampler=sampler, n_trials=4, seed=0,
            weight_precisions="int4,int8", activation_precisions="int8")
    assert len(r.trials) == 4 and all(t.state == "complete" for t in r.trials)
    assert r.settings["sampler"] == r.settings["options"]["sampler"] == sampler


def test_ties_and_pins_reach_the_trials(tmp_path):
    r = run(tmp_path, "tie", strategy="optuna", sampler="random", n_trials=6, seed=4,
            ties=[["features.0", "classifier.3"]], pin_first_last=False, pins={"features.4": "int4/int8"})
    assert r.space["ties"] == [["features.0", "classifier.3"]] and r.space["pins"] == {"features.4": "int4/int8"}
    for t in r.trials:
        assert t.config["features.0"] == t.config["classifier.3"]
        assert t.config["features.4"] == LayerChoice(P.INT4, P.INT8)
    f = run(tmp_path, "fl", strategy="optuna", n_trials=2, pin_first_last=True)
    for t in f.trials:
        assert t.config[LAYERS[0]] == W8A8 and t.config[LAYERS[-1]] == W8A8
    with pytest.raises(InvalidConfigError, match="no such quantizable layer"):
        run(tmp_path, "bad", strategy="optuna", n_trials=1, pins={"nope": "int8"})


def test_resume_continues_the_study_and_refuses_another_search(tmp_path):
    a = run(tmp_path, "r", strategy="optuna", n_trials=4, seed=5)
    first = [(t.config, t.metric) for t in a.trials]
    b = run(tmp_path, "r", strategy="optuna", n_trials=7, seed=5, resume=True)
    assert len(b.trials) == 7 and [(t.config, t.metric) for t in b.trials[:4]] == first
    assert [t.number for t in b.trials] == list(range(7))
    assert b.settings["resumed_trials"] == 4
    stored = json.loads((tmp_path / "r" / "result.json").read_text())
    assert len(stored["trials"]) == 7
    with pytest.raises(InvalidConfigError, match=r"differs in target"):
        run(tmp_path, "r", strategy="optuna", n_trials=8, target="arm-a76", resume=True)
    with pytest.raises(InvalidConfigError, match=r"differs in space"):
        run(tmp_path, "r", strategy="optuna", n_trials=8, weight_precisions="int8", resume=True)
    with pytest.raises(InvalidConfigError, match="nothing to resume"):
        run(tmp_path, "empty", strategy="optuna", n_trials=2, resume=True)
    with pytest.raises(InvalidConfigError, match="already exists"):
        run(tmp_path, "r2", strategy="optuna", n_trials=1, storage=f"journal:///{tmp_path / 'r' / 'study.log'}",
            study_name=a.settings["study_name"])


def test_killed_search_resumes_losing_at_most_the_trial_in_flight(tmp_path):
    out = tmp_path / "k"
    args = [sys.executable, "-m", "mpsearch.cli", "search", "--task", "digits", "--strategy", "optuna",
            "--seed", "1", "--out", str(out), "--no-mlflow", "--no-progress"]
    proc = subprocess.Popen([*args, "--trials", "500"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline:
        try:
            done = len(json.loads((out / "result.json").read_text())["trials"])
        except (OSError, ValueError):
            done = 0
        if done >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert done >= 5, proc.stderr.read()
    kept = json.loads((out / "result.json").read_text())["trials"]
    storage = make_storage(f"journal:///{out / 'study.log'}")
    study = optuna.load_study(study_name=optuna.study.get_all_study_names(storage)[0], storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) - len(kept) in (0, 1)  # result.json lags the study by at most the trial being written
    p = subprocess.run([*args, "--trials", str(len(finished) + 3), "--resume"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    final = json.loads((out / "result.json").read_text())["trials"]
    assert len(final) == len(finished) + 3
    assert [t["config"] for t in final[: len(kept)]] == [t["config"] for t in kept]


def test_cli_bad_search_options_are_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, msg in (
        (["--strategy", "greedy"], "unknown strategy 'greedy'"),
        (["--objectives", "metric,speed"], "unknown objective 'speed'"),
        (["--objectives", "latency"], "must include metric"),
        (["--sampler", "cmaes"], "unknown sampler 'cmaes'"),
        (["--pin", "features.0"], "--pin expects LAYER=WEIGHT/ACTIVATION"),
        (["--resume"], "resume needs the output directory"),
        (["--strategy", "exhaustive", "--exhaustive-limit", "10"], "over the exhaustive limit of 10"),
        (["--latency-budget", "0.00001"], "latency budget"),
    ):
        try:
            rc = main(["search", "--task", "digits", "--no-mlflow", "--no-progress", "--trials", "2", *argv])
        except SystemExit as e:  # argparse
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (argv, err)



def test_ilp_solutions_fit_a_latency_budget_once_conversions_are_priced(tmp_path):
    # the ILP sums per-layer latencies; the cost model adds int8 <-> fp32 conversions, so an
    # unchecked solution can land over the budget. Every ILP trial must be within it.
    probe = run(tmp_path, "p", strategy="optuna", n_trials=1)
    # halfway between FP32 and every layer on int8 kernels (int4 weights): a budget some
    # configurations meet (space.min_latency_ms, the sum of each layer's cheapest, leaves out
    # conversions and storage and may be met by none)
    cost_model, int8_kernels = profile_config("digits", precision="int4/int8")
    budget = (cost_model.price(int8_kernels).latency_ms + probe.reference["fp32_latency_ms"]) / 2
    r = run(tmp_path, "b", strategy="ilp", n_trials=8, latency_budget_ms=budget)
    assert r.trials and r.settings["ilp_solutions"] == len(r.trials)
    for t in r.trials:
        assert t.latency_ms <= budget and t.state == "complete", (t.latency_ms, budget, t.reason)
