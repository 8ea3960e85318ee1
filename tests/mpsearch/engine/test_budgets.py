"""Budgets people think in: relative budgets ("0.5xfp32", "75%int8") resolved against the target's
own uniform configurations, and weight bytes counted with or without the per-channel scales."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mpsearch
from hw_models import Candidate, CostModel, LayerSpec, Precision, get_profile
from mpsearch.engine.budgets import Relative, parse_budget, resolve
from mpsearch.engine.options import SearchOptions
from mpsearch.errors import BudgetError, InvalidConfigError

P = Precision
X86 = get_profile("x86-vnni")
# conv 16x8x3x3 (1152 weights, 16 channels) then linear 10x64 (640 weights, 10 channels)
CONV = LayerSpec("conv", "conv2d", (16, 8, 3, 3), 1, 115_200, 800, 1600)
FC = LayerSpec("fc", "linear", (10, 64), 1, 640, 64, 10)


@pytest.mark.parametrize(("text", "kind", "expected"), [
    ("75%int8", "size", Relative(0.75, "int8", "75%int8")),
    ("0.5xFP32", "latency", Relative(0.5, "fp32", "0.5xFP32")),
    (" 120 % int8 ", "memory", Relative(1.2, "int8", "120 % int8")),
    (".25xfp32", "size", Relative(0.25, "fp32", ".25xfp32")),
    ("8", "latency", 8.0),
    (2.5, "size", 2.5),
    (None, "memory", None),
])
def test_a_budget_is_a_number_or_relative_to_fp32_or_int8(text, kind, expected):
    assert parse_budget(text, kind) == expected


@pytest.mark.parametrize("bad", ["0%int8", "75%int4", "half", "-1", "0", "inf", float("nan"), True, "75%", "x0.5"])
def test_a_budget_that_cannot_work_is_refused_in_one_line(bad):
    with pytest.raises(InvalidConfigError) as e:
        parse_budget(bad, "size")
    assert str(e.value).startswith("the size budget must be a positive, finite number of MB, or relative to")
    assert "\n" not in str(e.value)


def test_relative_budgets_are_the_factor_times_the_reference_priced_by_hand():
    layers = [CONV, FC]
    given = {"latency": parse_budget("0.5xfp32", "latency"), "size": parse_budget("75%int8", "size"),
             "memory": parse_budget("2xint8", "memory")}
    cm = CostModel(layers, X86)
    b = resolve(given, cm)
    fp32 = cm.price(Candidate.uniform(["conv", "fc"], P.FP32, P.FP32))
    assert b.latency_ms == pytest.approx(0.5 * fp32.latency_ms, rel=1e-12)
    # int8 weights: (1152 + 16 scales x 4 bytes) + (640 + 10 x 4) = 1896 bytes
    assert b.size_bytes == pytest.approx(0.75 * 1896)
    # peak activations at int8: conv's input 800 bytes + its output read by fc at int8, 1600 bytes
    # (fc: 1600 + its fp32 output 10 x 4 is less)
    assert b.memory_bytes == pytest.approx(2 * (1896 + 2400))
    payload = resolve(given, CostModel(layers, X86, weight_counting="payload"))
    assert payload.size_bytes == pytest.approx(0.75 * (1152 + 640))
    assert payload.latency_ms == b.latency_ms  # latency does not depend on what is counted
    numbers = resolve({"latency": 3.0, "size": None, "memory": 1.5}, cm)  # numbers pass through, MB as bytes
    assert (numbers.latency_ms, numbers.size_bytes, numbers.memory_bytes) == (3.0, None, 1.5e6)


def test_a_reference_the_target_cannot_run_is_a_budget_error():
    bitfusion = CostModel([CONV, FC], get_profile("bitfusion"))  # an integer accelerator: no fp32
    with pytest.raises(BudgetError, match=r"latency budget 0.5xfp32: the target bitfusion cannot run uniform fp32"):
        resolve({"latency": parse_budget("0.5xfp32", "latency")}, bitfusion)


def test_options_keep_a_relative_budget_as_typed_and_read_older_versions():
    o = SearchOptions(task="digits", size_budget_mb="75%int8", latency_budget_ms="4", weight_bytes="payload")
    assert (o.size_budget_mb, o.latency_budget_ms) == ("75%int8", 4.0)
    assert SearchOptions.from_dict(o.to_dict()) == o
    v1 = {k: v for k, v in o.to_dict().items() if k != "weight_bytes"} | {"version": 1, "size_budget_mb": 0.5}
    assert SearchOptions.from_dict(v1).weight_bytes == "with-scales"  # a field v1 lacks takes its default
    with pytest.raises(InvalidConfigError, match="options version 4, this mpsearch reads version 3"):
        SearchOptions.from_dict({**o.to_dict(), "version": 4})
    with pytest.raises(InvalidConfigError, match="weight bytes: 'kernel' is not one of with-scales, payload"):
        SearchOptions(task="digits", weight_bytes="kernel")


def test_a_search_under_relative_budgets_holds_them_as_numbers_of_its_own_references(tmp_path):
    r = mpsearch.search("digits", n_trials=4, strategy="optuna", out_dir=tmp_path / "a", track=False,
                        progress=False, latency_budget_ms="90%fp32", size_budget_mb="0.6xint8")
    st, ref = r.settings, r.reference
    assert st["budgets_given"] == {"latency": "90%fp32", "size": "0.6xint8"} and st["weight_bytes"] == "with-scales"
    assert st["latency_budget_ms"] == pytest.approx(0.9 * ref["fp32_latency_ms"], rel=1e-12)
    assert st["size_budget_mb"] == pytest.approx(0.6 * ref["int8_weight_bytes"] / 1e6, rel=1e-12)
    for t in r.trials:  # the loop checks the numbers: priced over budget means never scored
        over = t.latency_ms > st["latency_budget_ms"] or t.weight_bytes > st["size_budget_mb"] * 1e6
        assert (t.state == "infeasible") == over, t
    # a resume resolves the same budgets, so its study is the same search
    r2 = mpsearch.search("digits", n_trials=6, strategy="optuna", out_dir=tmp_path / "a", track=False,
                         progress=False, latency_budget_ms="90%fp32", size_budget_mb="0.6xint8", resume=True)
    assert len(r2.trials) == 6 and r2.settings["size_budget_mb"] == st["size_budget_mb"]


def test_payload_counting_prices_every_trial_without_the_scales(tmp_path):
    r = mpsearch.search("digits", n_trials=3, strategy="optuna", out_dir=tmp_path / "p", track=False,
                        progress=False, weight_bytes="payload", size_budget_mb="75%int8")
    layers = r.layers
    assert r.reference["int8_weight_bytes"] == sum(x.weight_elems for x in layers)  # one byte a weight, no scales
    cm = CostModel(layers, get_profile("x86-vnni"), weight_counting="payload")
    for t in r.trials:
        assert t.weight_bytes == cm.price(t.config).weight_bytes


def test_the_command_line_takes_relative_budgets_and_refuses_bad_ones(tmp_path):
    out = tmp_path / "cli"
    p = subprocess.run([sys.executable, "-m", "mpsearch.cli", "search", "--task", "digits", "--trials", "3",
                        "--strategy", "optuna", "--out", str(out), "--no-mlflow", "--no-progress",
                        "--size-budget", "75%int8", "--weight-bytes", "payload"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    st = json.loads((out / "result.json").read_text())["settings"]
    assert st["budgets_given"] == {"size": "75%int8"} and st["options"]["size_budget_mb"] == "75%int8"
    assert f"{st['size_budget_mb']:.6g} MB of weights (75%int8)" in p.stdout
    bad = subprocess.run([sys.executable, "-m", "mpsearch.cli", "search", "--task", "digits",
                          "--latency-budget", "75%int4", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") <= 2 and "Traceback" not in bad.stderr
    assert "relative to the target's uniform fp32 or int8" in bad.stderr and not (tmp_path / "bad").exists()
