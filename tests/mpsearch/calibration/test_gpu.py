"""GPU calibration: GEMM lowering, kernel checks, the fit, and the command without a GPU.

The timing itself needs CUDA: `test_calibrates_on_cuda` runs only where torch sees a GPU (the
figures it validates come from benchmarks/gpu_profile.py on an H100). On this CPU the same code
runs with device="cpu" (real kernels: torch._int_mm, torch._scaled_mm).

torch._int_mm on a CPU without VNNI (oneDNN's AVX2 or AVX-512F int8 kernels, u8 x s8 pairs summed
in saturating int16) is wrong on full-range int8 operands; `check_kind` must say so and the
calibration leave int8 out there. INT8_EXACT says which case this CPU is (`make test-cpus` runs
both: ONEDNN_MAX_CPU_ISA=AVX2 turns VNNI off)."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hw_models import CostModel, LayerChoice, LayerSpec, Precision, get_profile
from hw_models.profile_file import dump_profile, load_profile
from mpsearch.calibration.fit import EFFICIENCY_GRID, fidelity
from mpsearch.calibration.gpu import (
    BANDWIDTH_SCALES,
    KINDS,
    Gemm,
    Measurement,
    calibrate_gpu,
    check_kind,
    fit_profile,
    layer_gemms,
    layer_table,
    predict,
    supports,
)

H100 = get_profile("h100")


def _int_mm_is_exact() -> bool:
    """Whether torch._int_mm computes full-range int8 products exactly on this CPU (by hand)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (64, 256), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (256, 128), generator=g, dtype=torch.int8)
    return torch.equal(torch._int_mm(a, w), a.int() @ w.int())


INT8_EXACT = _int_mm_is_exact()


def test_layers_lower_to_gemms_padded_to_16():
    conv = LayerSpec("c", "conv2d", (24, 16, 3, 3), 1, 24 * 16 * 9 * 28 * 28, 16 * 30 * 30, 24 * 28 * 28)
    depthwise = LayerSpec("d", "conv2d", (16, 1, 3, 3), 16, 16 * 9 * 784, 16 * 784, 16 * 784)
    fc = LayerSpec("fc", "linear", (1000, 1280), 1, 1000 * 1280, 1280, 1000)
    tokens = LayerSpec("q", "linear", (384, 384), 1, 128 * 384 * 384, 128 * 384, 128 * 384)  # 128 tokens
    got = layer_gemms([conv, depthwise, fc, tokens], batch_size=2)
    # conv: m = 2 x 28 x 28 output positions, k = 16 x 3 x 3 = 144, n = 24 -> 32 (padded to 16)
    # fc at batch 2: m = 2 (not padded), n = 1000 -> 1008; the depthwise convolution is no GEMM
    assert [(g.name, g.m, g.k, g.n) for g in got] == [
        ("c@b2", 1568, 144, 32), ("fc@b2", 2, 1280, 1008), ("q@b2", 256, 384, 384)]
    assert not supports("int8", got[1], "cpu") and supports("int8", got[0], "cpu")  # torch._int_mm: m > 16


@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp8"])
def test_kernels_compute_the_product_on_cpu(kind):
    assert check_kind(kind, "cpu") == ""


def test_the_int8_check_says_whether_this_cpu_computes_int8_right():
    got = check_kind("int8", "cpu")
    assert (got == "") == INT8_EXACT, got
    if not INT8_EXACT:
        assert got.startswith("wrong result: relative error ")


def test_int4_weight_only_is_reported_not_timed_on_cpu():
    assert check_kind("int4w", "cpu") == "no int4w kernel on cpu"


def _synthetic(gemms, eff, overhead, bandwidth):
    """Measurements that follow the roofline exactly at the given figures."""
    prof = replace(H100, efficiency=eff, layer_overhead_s=overhead, mem_bw_bytes_per_s=bandwidth)
    out = []
    for g in gemms:
        for kind, (w, a) in KINDS.items():
            rule = H100.rule(w, a)
            compute = rule.compute
            wb = g.n * g.k * w.bits // 8 + (4 * g.n if w.is_int else 4 if w == Precision.FP8_E4M3 else 0)
            moved = wb + g.m * (math.ceil(g.k * a.bits / 8) + 4 * g.n)
            peak = H100.peak_macs_per_s[compute] * eff[rule.kernel or compute]  # int4w: the weight-only kernel
            t = max(g.m * g.k * g.n / peak, moved / bandwidth) + overhead
            assert t == pytest.approx(CostModel([g.spec()], prof, g.m).layer_cost(g.name, LayerChoice(w, a)).latency_s)
            out.append(Measurement(g, kind, t, "graph"))
    return out


GEMMS = [Gemm(f"g{i}", m, k, n) for i, (m, k, n) in enumerate(
    [(32, 4096, 4096), (512, 4096, 4096), (8192, 8192, 8192), (2048, 768, 3072), (32, 768, 768), (4096, 4096, 14336)])]


def test_fit_recovers_efficiency_overhead_bandwidth_and_the_weight_only_kernel():
    eff = {"fp8": float(EFFICIENCY_GRID[70]), "int8": float(EFFICIENCY_GRID[68]),
           "fp16": float(EFFICIENCY_GRID[72]), "fp32": float(EFFICIENCY_GRID[76]),
           "weight_only": float(EFFICIENCY_GRID[20])}  # much slower than fp16 at the same peak
    copy = 2.4e12  # kernels stream operands faster than the copy measured
    ms = _synthetic(GEMMS, eff, overhead=3.5e-6, bandwidth=copy * float(BANDWIDTH_SCALES[28]))
    got, overhead, bandwidth, rms = fit_profile(H100, ms, copy)
    assert got == pytest.approx(eff) and overhead == pytest.approx(3.5e-6) and rms < 1e-9
    assert bandwidth == pytest.approx(copy * BANDWIDTH_SCALES[28])


def test_calibration_validates_held_out_products_and_writes_a_profile(tmp_path):
    gemms = [Gemm("a", 32, 64, 64), Gemm("b", 64, 256, 128), Gemm("c", 128, 128, 256), Gemm("d", 32, 512, 512)]
    cal = calibrate_gpu(H100, gemms, device="cpu", kinds=("fp32", "int8", "int4w"), rounds=2, progress=False)
    assert cal.checks["fp32"] == "" and cal.checks["int4w"] == "no int4w kernel on cpu"
    assert (cal.checks["int8"] == "") == INT8_EXACT  # a kernel computing wrong products is not timed
    timed = ("fp32", "int8") if INT8_EXACT else ("fp32",)
    assert [(m.gemm.name, m.kind) for m in cal.measurements] == [(g.name, k) for g in gemms for k in timed]
    assert all(m.seconds > 0 and m.mode == "cpu" for m in cal.measurements)
    p = cal.profile
    assert p.name == "h100-calibrated" and set(p.efficiency) == set(H100.efficiency)
    assert p.efficiency["fp16"] == H100.efficiency["fp16"]  # nothing fp16 was timed: kept
    assert p.sources["efficiency"].startswith("fitted: measured by mpsearch calibrate")
    assert ("8 matrix products (fp32, int8)" if INT8_EXACT else "4 matrix products (fp32)") in p.sources["efficiency"]
    assert f"PyTorch {torch.__version__}, CUDA " in p.sources["efficiency"]
    # the calibrated profile predicts each product as the fit says: prediction = roofline at the fitted figures
    m = cal.measurements[0]
    assert predict(p, m) == pytest.approx(max(
        m.gemm.m * m.gemm.k * m.gemm.n / (H100.peak_macs_per_s["fp32"] * p.efficiency["fp32"]),
        (m.gemm.n * m.gemm.k * 4 + m.gemm.m * (m.gemm.k * 4 + m.gemm.n * 4)) / p.mem_bw_bytes_per_s,
    ) + p.layer_overhead_s)
    v = cal.validation()
    assert set(v) == {"uncalibrated", "held_out", "calibrated"}
    n = 4 * len(timed)
    assert v["held_out"]["native"]["n"] == n // 2 and v["calibrated"]["native"]["n"] == n  # gemms b and d held out
    assert cal.speedups() == []  # speedups are over bf16, which was not timed
    path = tmp_path / "gpu.toml"
    path.write_text(dump_profile(p))
    assert load_profile(path) == p


def test_task_products_become_the_lookup_table():
    conv = LayerSpec("c", "conv2d", (32, 16, 3, 3), 1, 32 * 16 * 9 * 64, 16 * 100, 32 * 64)
    depthwise = LayerSpec("d", "conv2d", (32, 1, 3, 3), 32, 32 * 9 * 36, 32 * 64, 32 * 36)
    fc = LayerSpec("fc", "linear", (16, 1152), 1, 16 * 1152, 1152, 16)
    layers = [conv, depthwise, fc]
    gemms = layer_gemms(layers, batch_size=4)
    cal = calibrate_gpu(H100, gemms, device="cpu", kinds=("fp32", "bf16", "int8"), rounds=2, progress=False)
    t = {(m.gemm.name, m.kind): m.seconds for m in cal.measurements}
    table = layer_table(layers, H100, cal.measurements, 4)
    assert table.batch_size == 4 and table.other_s == 0.0
    int8 = {"int8": t[("c@b4", "int8")]} if INT8_EXACT else {}  # a wrong int8 kernel is not timed
    assert dict(table.layers["c"]) == {"macs": conv.macs, "fp32": t[("c@b4", "fp32")], "fp16": t[("c@b4", "bf16")],
                                       **int8}  # bf16 is priced as fp16 compute
    assert dict(table.layers["d"]) == {"macs": depthwise.macs}  # no GEMM: the roofline prices it
    assert set(table.layers["fc"]) == {"macs", "fp32", "fp16"}  # m = 4: no int8 kernel (m > 16)
    prof = replace(cal.profile, layer_table=table)
    cm = CostModel(layers, prof, 4)
    assert cm.measured
    if INT8_EXACT:
        assert cm.layer_cost("c", LayerChoice(Precision.INT8, Precision.INT8)).latency_s == t[("c@b4", "int8")]
    assert cm.layer_cost("fc", LayerChoice(Precision.BF16, Precision.BF16)).latency_s == t[("fc@b4", "bf16")]
    roofline = CostModel(layers, cal.profile, 4)
    for fqn, pair in (("d", (Precision.BF16, Precision.BF16)), ("fc", (Precision.INT8, Precision.INT8))):
        assert cm.layer_cost(fqn, LayerChoice(*pair)).latency_s == roofline.layer_cost(fqn, LayerChoice(*pair)).latency_s


def test_unknown_kind_and_no_products_are_typed_errors():
    from mpsearch.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError, match="unknown product kind"):
        calibrate_gpu(H100, [Gemm("a", 32, 64, 64)], device="cpu", kinds=("int3",))
    with pytest.raises(InvalidConfigError, match="no matrix products"):
        calibrate_gpu(H100, [], device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cli_without_a_gpu_says_so_in_one_line(tmp_path, capsys):
    from mpsearch.cli import main

    assert main(["calibrate", "--task", "digits", "--target", "h100", "--out", str(tmp_path / "h.toml")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mpsearch: error: calibrating h100 times matrix products on a CUDA GPU; torch sees none on this machine"]
    assert not (tmp_path / "h.toml").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrates_on_cuda():
    gemms = [Gemm("small", 32, 1024, 1024), Gemm("mid", 1024, 4096, 4096), Gemm("large", 4096, 4096, 4096)]
    cal = calibrate_gpu(H100, gemms, rounds=3, progress=False)
    assert cal.checks["bf16"] == "" and cal.checks["int8"] == ""
    assert all(m.mode == "graph" for m in cal.measurements)
    big = {m.kind: m.seconds for m in cal.measurements if m.gemm.name == "large"}
    assert big["bf16"] < big["fp32"]  # tensor cores beat CUDA cores on a compute-bound product
    assert 0.1e12 < cal.copy_bandwidth < 10e12 and not cal.failed
    assert np.isfinite(cal.fit["rms_log"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrate_command_path_on_cuda_writes_a_table_for_the_task(tmp_path):
    from mpsearch.calibration.cpu import _calibrate_gpu, write_profile
    from mpsearch.scoring.analysis import analyze
    from mpsearch.tasks import load_task

    cal = _calibrate_gpu("digits", H100, name="h100-here", batch_size=32, seed=0, progress=False)
    path = write_profile(cal, tmp_path / "h.toml")
    prof = load_profile(path)
    task = load_task("digits")
    layers = analyze(task.model, task.example_input).layers
    cm = CostModel(layers, prof, 32)
    assert prof.name == "h100-here" and cm.measured
    gemm = next(x for x in layers if x.groups == 1)
    assert {"fp32", "fp16", "fp8", "int8"} <= set(prof.layer_table.layers[gemm.fqn])


RECORD = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "h100-2026-11-28.json"


def _recorded() -> tuple[list[Measurement], float]:
    d = json.loads(RECORD.read_text())
    ms = [Measurement(Gemm(p["name"], p["m"], p["k"], p["n"]), p["kind"], p["measured_s"], p["mode"])
          for p in d["products"]]
    return ms, d["copy_bandwidth_Bps"]


def test_builtin_h100_figures_are_the_fit_of_the_recorded_h100_measurements():
    ms, copy = _recorded()
    assert len(ms) == 522 and all(m.mode == "graph" for m in ms)
    eff, overhead, bandwidth, _ = fit_profile(H100, ms, copy)
    for kind in ("fp8", "int8", "fp16", "fp32"):
        assert H100.efficiency[kind] == pytest.approx(eff[kind], rel=0.01)
    assert H100.layer_overhead_s == pytest.approx(overhead) and H100.mem_bw_bytes_per_s == pytest.approx(bandwidth, rel=0.01)
    # weight_only is the one figure not taken from the fit: PyTorch's int4 kernel is far slower
    assert eff["weight_only"] < 0.05 < H100.efficiency["weight_only"] == H100.efficiency["fp16"]


def test_builtin_h100_predicts_the_recorded_products():
    ms, _ = _recorded()
    sweep = [m for m in ms if "@" not in m.gemm.name and m.kind in ("bf16", "fp8")]
    native = [m for m in ms if m.kind in ("fp32", "bf16", "fp8", "int8")]
    for sel, rank, mape in ((sweep, 0.99, 8.0), (native, 0.97, 22.0)):
        f = fidelity([predict(H100, m) for m in sel], [m.seconds for m in sel])
        assert f["spearman"] >= rank and f["mape"] <= mape
