"""Calibration: the fits recover known figures; the command writes a profile that works as a target."""

import contextlib
import io
import math

import pytest

from hw_models import Candidate, CostModel, LayerChoice, LayerSpec, Precision, get_profile
from hw_models.profile_file import load_profile
from mpsearch.calibration.cpu import _fit_roofline, random_configs, session_noise
from mpsearch.calibration.fit import EFFICIENCY_GRID
from mpsearch.scoring.analysis import analyze

X86 = get_profile("x86-vnni")
P = Precision


def _digits_layers():
    from mpsearch.scoring.analysis import analyze
    from mpsearch.tasks import load_task

    task = load_task("digits")
    return analyze(task.model, task.example_input).layers


def test_roofline_fit_recovers_efficiency_and_overhead():
    layers = [LayerSpec(f"l{i}", "conv2d", (c, c, 3, 3), 1, c * c * 9 * hw, c * hw, c * hw)
              for i, (c, hw) in enumerate([(16, 3136), (32, 784), (64, 196), (128, 49), (8, 12544)])]

    class A:  # the part of ModelAnalysis the fit reads
        pass

    analysis = A()
    analysis.layers = tuple(layers)
    eff = {"fp32": float(EFFICIENCY_GRID[60]), "int8": float(EFFICIENCY_GRID[30])}
    overhead = 20e-6
    times = {}
    for kind, bits in (("fp32", 32), ("int8", 8)):
        times[kind] = {}
        for x in layers:
            wb = x.weight_elems * bits // 8 + (4 * x.out_channels if kind == "int8" else 0)
            mem = (wb + math.ceil(x.in_elems * bits / 8) + x.out_elems * 4) / X86.mem_bw_bytes_per_s
            times[kind][x.fqn] = max(x.macs / (X86.peak_macs_per_s[kind] * eff[kind]), mem) + overhead
    got, o, rms = _fit_roofline(X86, analysis, 1, times)
    assert got == pytest.approx(eff) and o == pytest.approx(overhead) and rms < 1e-9


def test_random_configs_are_seeded_and_span_the_range():
    fqns = tuple(f"l{i}" for i in range(20))
    a, b = random_configs(fqns, 30, seed=4), random_configs(fqns, 30, seed=4)
    assert a == b and a != random_configs(fqns, 30, seed=5)
    sizes = [len(c) for c in a]
    assert min(sizes) <= 4 and max(sizes) >= 16


def test_session_noise_compares_each_session_with_its_copies():
    # fp32: 10 vs 11 -> 1 / 10.5; int8: 20 vs 18 and 20 vs 22 -> 2 / 19 and 2 / 21; mixtures have no copies
    t = {"fp32": 10.0, "fp32~1": 11.0, "int8": 20.0, "int8~1": 18.0, "int8~2": 22.0, "mixed_0": 5.0}
    assert session_noise(t) == pytest.approx(100 * (1 / 10.5 + 2 / 19 + 2 / 21) / 3)
    assert session_noise({"fp32": 1.0, "mixed_0": 2.0}) is None


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """`mpsearch calibrate` run once on digits: (the profile file, what the command printed)."""
    pytest.importorskip("onnxruntime")
    from mpsearch.cli import main

    out = tmp_path_factory.mktemp("calibrated") / "my-cpu.toml"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["calibrate", "--task", "digits", "--out", str(out), "--mixed", "3", "--no-progress",
                   "--name", "my-cpu"])
    assert rc == 0
    return out, printed.getvalue()


def test_calibrate_command_says_what_it_measured(calibrated):
    out, text = calibrated
    assert f"wrote {out}" in text and "3 random mixtures" in text
    assert "identical sessions built separately differ by" in text


def test_calibrated_profile_holds_fitted_figures_and_each_layer_s_measured_times(calibrated):
    prof = load_profile(calibrated[0])
    assert prof.name == "my-cpu" and prof.kind == "cpu"
    assert all(0 < v <= 1 for v in prof.efficiency.values())
    assert "fitted" in prof.sources["efficiency"] and "digits" in prof.sources["efficiency"]
    table = prof.layer_table
    assert set(table.layers) == {"features.0", "features.2", "features.4", "features.6", "features.8",
                                 "features.10", "classifier.1", "classifier.3"}
    assert all(e["fp32"] > 0 and e["int8"] > 0 for e in table.layers.values())
    # the deployed graph's conversions are priced apart: no chain contexts, a cost per element of
    # QuantizeLinear and of DequantizeLinear
    assert not any(">" in k or "@" in k for e in table.layers.values() for k in e)
    assert prof.quantize_bytes_per_elem is not None and prof.dequantize_bytes_per_elem is not None


def test_calibrated_profile_prices_the_measured_layers_plus_the_graph_s_conversions(calibrated):
    from mpsearch.scoring.onnx_graph import deploy_graph_of
    from mpsearch.tasks import load_task

    prof = load_profile(calibrated[0])
    table = prof.layer_table
    task = load_task("digits")
    graph = deploy_graph_of(task, analyze(task.model, task.example_input))
    fqns = list(table.layers)
    int8 = {"features.2", "features.4", "classifier.3"}
    cand = Candidate((f, LayerChoice(P.INT8, P.INT8) if f in int8 else LayerChoice(P.FP32, P.FP32)) for f in fqns)
    bounds = graph.boundaries(graph.plan(dict(cand.items())))
    # features.2 and .4 quantize their inputs (one Q before features.2; .4 reads .2's int8 output),
    # .4's output is read by the fp32 features.6 (a DQ), classifier.3 quantizes its own input
    assert sorted((b.kind, b.layer) for b in bounds) == [("dq", "features.4"), ("q", "classifier.3"),
                                                          ("q", "features.2")]
    per = {"q": prof.quantize_bytes_per_elem, "dq": prof.dequantize_bytes_per_elem}
    expected = (table.other_s + sum(table.layers[f]["int8" if f in int8 else "fp32"] for f in fqns)
                + sum(prof.transition_overhead_s + b.elems * per[b.kind] / prof.mem_bw_bytes_per_s for b in bounds))
    assert CostModel(_digits_layers(), prof, 1, graph).price(cand).latency_s == pytest.approx(expected)


def test_calibrated_profile_works_as_a_target_and_is_read_from_its_file(calibrated, tmp_path, capsys):
    from mpsearch.cli import main

    out = calibrated[0]
    rc = main(["profile", "--task", "digits", "--target", str(out), "--precision", "int8"])
    text = capsys.readouterr().out
    assert rc == 0 and "my-cpu" in text and "(measured per-layer table)" in text
    # a changed copy of the file is read back as changed (the file is what is used)
    bad = tmp_path / "bad.toml"
    bad.write_text(out.read_text().replace("layer_overhead_s = ", "layer_overhead_s = -", 1))
    rc = main(["profile", "--task", "digits", "--target", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "layer_overhead_s" in err and str(bad) in err


def test_calibrate_refuses_an_out_file_that_is_no_toml_and_a_target_that_is_no_cpu(tmp_path, capsys):
    from mpsearch.cli import main

    rc = main(["calibrate", "--task", "digits", "--out", str(tmp_path / "x.json")])
    assert rc == 2 and ".toml" in capsys.readouterr().err
    rc = main(["calibrate", "--task", "digits", "--target", "cortex-m7", "--out", str(tmp_path / "p.toml")])
    assert rc == 2 and "cortex-m7 is a mcu profile" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any measurement or write
