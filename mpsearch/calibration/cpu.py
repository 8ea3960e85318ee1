"""`mpsearch calibrate`: fit a hardware profile to latencies measured on this machine.

GPU profiles (kind "gpu", e.g. h100) are measured differently: matrix products on a CUDA GPU
(`mpsearch.calibration.gpu`). What follows is the CPU calibration.

What is measured (ONNX Runtime on the CPU, fixed thread count; mpsearch.deploy.measure): the deployed
graphs of the configurations (mpsearch.deploy.build: the graph `export --format onnx` writes), so
the profile prices what a user ships.

* sessions of the task's model with all layers FP32, all layers int8, two alternating
  configurations (even / odd layers int8) and `n_mixed` random mixtures;
* per layer, ONNX Runtime's profiler on the all-FP32 and all-int8 sessions: each layer's FP32
  time and its int8 time;
* end to end, every session timed interleaved against the all-FP32 one (drift cancels).

What is fitted:

* the profile's efficiency per compute kind (fp32, int8) and its per-layer overhead, by a grid
  search minimising the squared log error of the roofline against the per-layer times;
* a lookup table of the measured per-layer times (and the model's non-layer time), which the
  cost model uses for this model (`hw_models.profile.LayerTable`); other models get the
  fitted roofline;
* the cost of the deployed graph's conversions (hw_models.graph: a QuantizeLinear where an int8
  layer reads a float tensor, a DequantizeLinear where a float op reads an int8 one, residual Adds
  and poolings included), one overhead plus bytes per element for each kind, by non-negative
  least squares on what the table leaves unexplained in the end-to-end times of all timed
  configurations. On mobilenet_v2 this took held-out predictions from Spearman 0.94 / 0.91 (the
  layer chain's conversions, each layer fitted in its neighbours' context) to 0.97 / 0.96 at 1 / 2
  threads (benchmarks/deploy.py).

A model that cannot be exported to ONNX has no deployed graph: its conversions are priced where
the compute kind changes between consecutive layers, each layer's time in context
("fp32>int8>int8"), fitted by ridge regression (`_fit_states`), and "int8@exit" entries from
the alternating sessions.

The result is a profile file that works wherever a target name does (`--target my-cpu.toml`).
"""

from __future__ import annotations

import datetime as _dt
import math
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import nnls
from tqdm import tqdm

from hw_models import CostModel, HardwareProfile, LayerChoice, Precision
from hw_models.graph import DeployGraph
from hw_models.profile import LayerTable
from hw_models.profile_file import dump_profile
from mpsearch.cache import atomic_write_bytes, cache_dir
from mpsearch.calibration.fit import fidelity, fit_roofline
from mpsearch.defaults import DEFAULT_TARGET
from mpsearch.errors import InvalidConfigError
from mpsearch.host import cpu_info
from mpsearch.scoring.analysis import ModelAnalysis, analyze
from mpsearch.scoring.evaluator import Evaluator
from mpsearch.tasks import Task, load_task
from mpsearch.tasks.base import first_samples

if TYPE_CHECKING:  # pragma: no cover
    from mpsearch.calibration.gpu import GpuCalibration

# Profiled runs per session: at least `repeats`, more for a fast model until they add up to
# MIN_PROFILE_S (the profiler ticks in microseconds; averaging many runs resolves short kernels).
MIN_PROFILE_S = 0.1
MAX_PROFILE_RUNS = 400
PROFILED_COPIES = 2
# Ridge penalty of the context fit (`_fit_states`), relative to one configuration's squared
# residual: a context seen in a few configurations moves part of the way from its prior.
STATE_RIDGE = 1.0
# Separately built sessions of one configuration further apart than this (%, on average): say so.
NOISY_PCT = 10.0
# Per-layer overheads tried by the roofline fit.
OVERHEAD_GRID = np.linspace(0.0, 100e-6, 101)


@dataclass
class Calibration:
    """A fitted profile and what it was fitted on."""

    profile: HardwareProfile
    batch_size: int
    threads: int
    end_to_end: dict[str, float]  # session -> measured seconds
    predicted: dict[str, float]  # session -> calibrated prediction (seconds)
    fit: dict[str, float] = field(default_factory=dict)
    graph: DeployGraph | None = None  # the model's deployed graph the profile prices (None: chain)

    def summary(self) -> str:
        p = self.profile
        eff = ", ".join(f"{k} {v:.3g}" for k, v in p.efficiency.items())
        lines = [
            (f"profile {p.name}: efficiency {eff}; overhead {p.layer_overhead_s * 1e6:.3g} us/layer; " +
            (f"conversion {p.transition_overhead_s * 1e6:.3g} us + QuantizeLinear {p.quantize_bytes_per_elem:.3g} / "
             f"DequantizeLinear {p.dequantize_bytes_per_elem:.3g} B/element (the deployed graph's own)"
             if p.quantize_bytes_per_elem is not None else
             f"transition {p.transition_overhead_s * 1e6:.3g} us + {p.transition_bytes_per_elem:.3g} B/element")),
            f"{p.sources.get('efficiency', '')}",
            (f"measured at batch size {self.batch_size}, {self.threads} thread(s); roofline fit rms log error "
            f"{self.fit.get('roofline_rms_log', float('nan')):.3f}"),
            f"{'session':12s} {'measured_ms':>12s} {'predicted_ms':>12s}",
        ]
        mixed = [k for k in self.end_to_end if k.startswith("mixed_")]
        for k, v in self.end_to_end.items():
            if k not in mixed and "~" not in k:  # the named sessions, not their copies
                lines.append(f"{k:12s} {v * 1e3:12.4g} {self.predicted[k] * 1e3:12.4g}")
        noise = session_noise(self.end_to_end)
        if noise is not None:
            lines.append(f"identical sessions built separately differ by {noise:.1f}% on average (the measurement's "
                         "own noise" + ("; that is a lot: try fewer --threads or a quieter machine)"
                                        if noise > NOISY_PCT else ")"))
        if len(mixed) >= 2:
            f = fidelity([self.predicted[k] for k in mixed], [self.end_to_end[k] for k in mixed])
            lines.append(f"{len(mixed)} random mixtures (fitted on; held-out figures: benchmarks/cost_model.py): "
                         f"spearman {f['spearman']:.3f}, MAPE {f['mape']:.1f}%, within 10% {f['within_10pct']:.0%}")
        return "\n".join(lines)


def session_noise(end_to_end: Mapping[str, float]) -> float | None:
    """How far separately built sessions of one configuration ("k" and its copies "k~1", ...)
    are apart: the mean over configurations of |a - b| / ((a + b) / 2) between the first
    session and each copy, in %. None without copies."""
    diffs = []
    for k, v in end_to_end.items():
        a = end_to_end.get(k.split("~")[0]) if "~" in k else None
        if a is not None:
            diffs.append(abs(a - v) / ((a + v) / 2) * 100)
    return sum(diffs) / len(diffs) if diffs else None


def random_configs(fqns: tuple[str, ...], n: int, seed: int) -> list[frozenset[str]]:
    """n random int8 layer sets: a share p ~ U(0, 1) per configuration, each layer int8 with
    probability p (so configurations range from nearly FP32 to nearly all int8)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.random()
        out.append(frozenset(f for f in fqns if rng.random() < p))
    return out


def calibrate(
    task: Task | str,
    target: str | HardwareProfile = DEFAULT_TARGET,
    *,
    name: str | None = None,
    threads: int | None = None,
    batch_size: int = 1,
    n_mixed: int = 40,
    rounds: int = 5,
    repeats: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> Calibration | GpuCalibration:
    """Measure `task`'s model on this machine and fit `target`'s profile to it (module doc; a GPU
    profile gives a `mpsearch.calibration.gpu.GpuCalibration`)."""
    from mpsearch.deploy.measure import (
        build_session,
        config_candidate,
        profile_layers,
        time_interleaved,
        timing_number,
    )
    from mpsearch.targets import resolve_target

    base = resolve_target(target)
    if base.kind == "gpu":
        return _calibrate_gpu(task, base, name=name, batch_size=batch_size, seed=seed, progress=progress)
    if base.kind != "cpu":
        raise InvalidConfigError(
            f"calibrate measures this machine's CPU with ONNX Runtime or a CUDA GPU with PyTorch; {base.name} "
            f"is a {base.kind} profile"
        )
    if batch_size < 1 or n_mixed < 0 or rounds < 1 or repeats < 1:
        raise InvalidConfigError("batch size, rounds and repeats must be positive, mixed configurations >= 0")
    threads = threads or base.threads or 1
    task_obj = load_task(task) if isinstance(task, str) else task
    analysis = analyze(task_obj.model, task_obj.example_input)
    evaluator = Evaluator(task_obj, analysis, cache_dir=cache_dir("evaluator"))
    batch = first_samples(task_obj.eval_batches[0][0], batch_size)
    fqns = analysis.fqns
    configs: dict[str, frozenset[str]] = {
        "fp32": frozenset(),
        "int8": frozenset(fqns),
        "alt_even": frozenset(fqns[0::2]),
        "alt_odd": frozenset(fqns[1::2]),
    }
    # each profiled configuration as PROFILED_COPIES separately built sessions: on a model of tens of
    # microseconds identical sessions differ by up to ~15% (memory placement); the table averages them
    profiled = {k: [k] + [f"{k}~{j}" for j in range(1, PROFILED_COPIES)] for k in configs}
    for k, copies in profiled.items():
        for copy in copies[1:]:
            configs[copy] = configs[k]
    for i, c in enumerate(random_configs(fqns, n_mixed, seed)):
        configs[f"mixed_{i}"] = c
    runners = {}
    bar = tqdm(configs.items(), desc="building sessions", unit="session", file=sys.stderr, disable=not progress)
    for k, int8 in bar:
        runners[k] = build_session(task_obj, analysis, evaluator, int8, threads=threads)
    graph = evaluator.deploy_graph
    evaluator.close()
    number = timing_number(runners["fp32"], batch)
    measured = time_interleaved(runners, batch, rounds=rounds, reference="fp32", seed=seed, number=number)
    runs = min(MAX_PROFILE_RUNS, max(repeats, math.ceil(MIN_PROFILE_S / measured["fp32"])))
    profiles = {}
    for k in tqdm([c for copies in profiled.values() for c in copies], desc="profiling layers",
                  unit="session", file=sys.stderr, disable=not progress):
        profiles[k] = profile_layers(runners[k], batch, analysis, repeats=runs, threads=threads)

    # per-layer times, scaled so that each session's profile total matches its interleaved time,
    # averaged over the copies
    def scaled(k: str) -> dict[str, float]:
        sums: dict[str, list[float]] = {}
        for copy in profiled[k]:
            prof = profiles[copy]
            s = measured[copy] / prof.total if prof.total > 0 else 1.0
            for f, v in prof.layers.items():
                sums.setdefault(f, []).append(v * s)
        return {f: sum(v) / len(v) for f, v in sums.items()}

    fp32, int8 = scaled("fp32"), scaled("int8")
    exits: dict[str, float] = {}
    for k in ("alt_even", "alt_odd") if graph is None else ():
        times = scaled(k)
        for i, f in enumerate(fqns[:-1]):
            if f in configs[k] and fqns[i + 1] not in configs[k] and f in times:
                exits[f] = times[f]
    entries = {}
    for layer in analysis.layers:
        e: dict[str, float] = {"macs": float(layer.macs)}
        if layer.fqn in fp32:
            e["fp32"] = fp32[layer.fqn]
        if layer.fqn in int8:
            e["int8"] = int8[layer.fqn]
        if layer.fqn in exits:
            e["int8@exit"] = exits[layer.fqn]
        entries[layer.fqn] = e
    fp32_s = sum(measured[c] for c in profiled["fp32"]) / len(profiled["fp32"])
    other_s = max(0.0, fp32_s - sum(fp32.values()))

    # roofline fit on the per-layer times
    efficiency, overhead, rms = _fit_roofline(base, analysis, batch_size, {"fp32": fp32, "int8": int8})
    fitted = replace(base, efficiency={**base.efficiency, **efficiency}, layer_overhead_s=overhead)

    # conversions: non-negative least squares on what the table leaves unexplained end to end
    table = LayerTable(entries, batch_size, other_s)
    no_trans = replace(fitted, transition_overhead_s=0.0, transition_bytes_per_elem=0.0, quantize_bytes_per_elem=None,
                       dequantize_bytes_per_elem=None, layer_table=table)
    # the same table with a conversion costing 1 s (counts them) or 1 s per element (sums elements): in
    # the deployed graph's own boundaries (hw_models.graph), QuantizeLinear and DequantizeLinear apart;
    # without a deploy graph, at each change of compute kind along the layers
    per_elem = replace(no_trans, mem_bw_bytes_per_s=1.0)
    columns = [replace(no_trans, transition_overhead_s=1.0)]
    if graph is not None:
        columns += [replace(per_elem, quantize_bytes_per_elem=1.0, dequantize_bytes_per_elem=0.0),
                    replace(per_elem, quantize_bytes_per_elem=0.0, dequantize_bytes_per_elem=1.0)]
    else:
        columns += [replace(per_elem, transition_bytes_per_elem=1.0)]
    layers_only = CostModel(analysis.layers, no_trans, batch_size, graph)
    models = [CostModel(analysis.layers, prof, batch_size, graph) for prof in columns]
    rows, resid = [], []
    for k, c in configs.items():
        cand = config_candidate(analysis, c)
        rows.append([m.price(cand).transition_s for m in models])
        resid.append(measured[k] - layers_only.price(cand).latency_s)
    coef, _ = nnls(np.array(rows), np.array(resid))
    t_over = float(coef[0])
    per = [float(x) * base.mem_bw_bytes_per_s for x in coef[1:]]  # elements -> bytes at the bandwidth
    q_bytes, dq_bytes = (per[0], per[1]) if graph is not None else (None, None)
    t_bytes = per[0] if graph is None else (per[0] + per[1]) / 2
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    cpu = cpu_info()
    features = ", ".join(cpu["features"]) or "no int8 dot-product features"
    where = (f"measured by mpsearch calibrate on {cpu['host']} ({cpu['cpu']}; {features}), {stamp}, "
             f"task {task_obj.name}, ONNX Runtime deployed graphs, {threads} thread(s), batch {batch_size}")
    profile = replace(
        fitted,
        name=name or f"{base.name}-calibrated",
        description=f"{base.description}; calibrated on this machine",
        threads=threads,
        transition_overhead_s=t_over,
        transition_bytes_per_elem=t_bytes,
        quantize_bytes_per_elem=q_bytes,
        dequantize_bytes_per_elem=dq_bytes,
        layer_table=table,
        sources={
            **base.sources,
            "efficiency": f"fitted to per-layer latencies {where}",
            "layer_overhead_s": f"fitted to per-layer latencies {where}",
            "transitions": f"fitted to end-to-end latencies of {len(configs)} configurations {where}",
        },
    )
    rms_states = float("nan")
    if graph is None:  # no deployed graph to price: each layer's time in its chain context instead
        states, rms_states = _fit_states(profile, analysis, batch_size, configs, measured)
        table = LayerTable({f: {**e, **states[f]} for f, e in entries.items()}, batch_size, other_s)
        profile = replace(profile, layer_table=table)
    cm = CostModel(analysis.layers, profile, batch_size, graph)
    predicted = {k: cm.price(config_candidate(analysis, c)).latency_s for k, c in configs.items()}
    return Calibration(profile, batch_size, threads, measured, predicted,
                       {"roofline_rms_log": rms, "other_s": other_s, "n_configs": len(configs),
                        "state_rms_s": rms_states}, graph)


def _calibrate_gpu(task: Task | str, base: HardwareProfile, *, name: str | None, batch_size: int, seed: int,
                   progress: bool):
    """A GPU profile: the task's layers lowered to matrix products at `batch_size`, and a short
    sweep, timed on this machine's CUDA GPU (`mpsearch.calibration.gpu`); the fitted roofline,
    and the task's products as the profile's lookup table."""
    import torch

    from mpsearch.calibration.gpu import calibrate_gpu, gemm_sweep, layer_gemms, layer_table

    if not torch.cuda.is_available():  # before loading the task
        raise InvalidConfigError(f"calibrating {base.name} times matrix products on a CUDA GPU; torch sees none "
                                 "on this machine")
    if batch_size < 1:
        raise InvalidConfigError("batch size must be positive")
    task_obj = load_task(task) if isinstance(task, str) else task
    analysis = analyze(task_obj.model, task_obj.example_input)
    gemms = layer_gemms(analysis.layers, batch_size) + gemm_sweep(quick=True)
    cal = calibrate_gpu(base, gemms, name=name, seed=seed, progress=progress,
                        context=f"task {task_obj.name} at batch {batch_size} and a sweep")
    cal.profile = replace(cal.profile, layer_table=layer_table(analysis.layers, base, cal.measurements, batch_size))
    return cal


def _fit_roofline(base: HardwareProfile, analysis: ModelAnalysis, batch: int,
                  times: dict[str, dict[str, float]]) -> tuple[dict[str, float], float, float]:
    """Efficiency per compute kind and one per-layer overhead fitted to the measured per-layer
    times (`mpsearch.calibration.fit.fit_roofline`)."""
    at_peak = CostModel(analysis.layers, replace(base, efficiency={}, layer_table=None), batch)
    kinds = {}
    for kind, measured in times.items():
        if kind not in base.peak_macs_per_s:
            continue
        p = Precision.INT8 if kind == "int8" else Precision.FP32
        rows = []
        for layer in analysis.layers:
            t = measured.get(layer.fqn)
            if t is None or t <= 0:
                continue
            c = at_peak.layer_cost(layer.fqn, LayerChoice(p, p))  # compute at efficiency 1
            rows.append((c.compute_s, c.memory_s, t))
        if rows:
            kinds[kind] = np.array(rows)
    if not kinds:
        raise InvalidConfigError("no layer could be timed; nothing to fit")
    return fit_roofline(kinds, OVERHEAD_GRID)


def _fit_states(profile: HardwareProfile, analysis: ModelAnalysis, batch: int, configs: dict[str, frozenset[str]],
                measured: dict[str, float]) -> tuple[dict[str, dict[str, float]], float]:
    """Each layer's latency in each context, "<prev>><own>><next>": the compute kinds (fp32,
    int8) of the layer before it, its own and the layer's after it (io_compute at the ends),
    its conversions included. ONNX Runtime picks a layer's kernels by its neighbours, so a layer
    costs what its context makes it cost. The prior is the per-layer model's share
    (`CostModel.in_context`); ridge regression (STATE_RIDGE) on what that model leaves
    unexplained in the measured configurations corrects it (contexts no configuration has keep
    the prior). Returns fqn -> {context: seconds}, and the rms end-to-end residual after the fit."""
    from mpsearch.deploy.measure import config_candidate

    cm = CostModel(analysis.layers, profile, batch)
    io, kinds = profile.io_compute, ("fp32", "int8")
    n = len(analysis.layers)
    columns: dict[tuple[int, str], int] = {}
    prior = []
    for i in range(n):
        for prev in (io,) if i == 0 else kinds:
            for own in kinds:
                for nxt in (io,) if i == n - 1 else kinds:
                    p = Precision.INT8 if own == "int8" else Precision.FP32
                    columns[(i, f"{prev}>{own}>{nxt}")] = len(prior)
                    prior.append(cm.in_context(i, cm.layer_cost(analysis.fqns[i], LayerChoice(p, p)), prev, nxt)[0])
    prior_arr = np.array(prior)
    rows, resid = [], []
    for k, c in configs.items():
        own = ["int8" if f in c else "fp32" for f in analysis.fqns]
        x = np.zeros(len(prior))
        for i in range(n):
            x[columns[(i, f"{own[i - 1] if i else io}>{own[i]}>{own[i + 1] if i + 1 < n else io}")]] = 1.0
        rows.append(x)
        resid.append(measured[k] - cm.price(config_candidate(analysis, c)).latency_s)
    a, r = np.array(rows), np.array(resid)
    delta = np.linalg.solve(a.T @ a + STATE_RIDGE * np.eye(len(prior)), a.T @ r)
    fitted = np.maximum(prior_arr + delta, 0.0)
    out: dict[str, dict[str, float]] = {f: {} for f in analysis.fqns}
    for (i, key), j in columns.items():
        out[analysis.fqns[i]][key] = float(fitted[j])
    # what remains unexplained end to end (other_s and the table's non-layer time are outside the states)
    after = r - a @ (fitted - prior_arr)
    return out, float(np.sqrt(np.mean(after**2)))


def write_profile(cal: Calibration, out: str | Path) -> Path:
    path = Path(out)
    if path.suffix != ".toml":
        raise InvalidConfigError(f"the profile file must end in .toml, got {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, dump_profile(cal.profile).encode())
    except OSError as e:
        raise InvalidConfigError(f"cannot write {path}: {e.strerror or e}") from None
    return path


__all__ = ["Calibration", "calibrate", "random_configs", "write_profile"]
