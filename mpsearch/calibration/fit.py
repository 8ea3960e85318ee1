"""Fitting a profile's roofline to measured latencies, and scoring predictions against them.

Shared by the CPU calibration (`mpsearch.calibration.cpu`), the GPU calibration
(`mpsearch.calibration.gpu`) and the fidelity benchmarks. NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# The efficiency grid of the roofline fit (share of peak per compute kind).
EFFICIENCY_GRID = np.geomspace(0.002, 1.0, 80)


def fit_roofline(rows: Mapping[str, np.ndarray], overhead_grid: Sequence[float]) -> tuple[dict[str, float], float, float]:
    """Efficiency per compute kind and one per-layer overhead minimising the squared log error
    of max(compute_s / efficiency, memory_s) + overhead against measured seconds.

    rows: compute kind -> array [n, 3] of (compute seconds at peak, memory seconds, measured
    seconds). Returns (efficiency per kind, overhead, rms log error over all rows)."""
    kinds = {k: np.asarray(r, dtype=float) for k, r in rows.items() if len(r)}
    if not kinds:
        raise ValueError("no measured latencies to fit")
    best = (math.inf, {}, 0.0)
    for o in overhead_grid:
        total, effs = 0.0, {}
        for kind, r in kinds.items():
            pred = np.maximum(r[:, 0:1] / EFFICIENCY_GRID[None, :], r[:, 1:2]) + o  # [rows, grid]
            err = ((np.log(pred) - np.log(r[:, 2:3])) ** 2).sum(0)
            j = int(err.argmin())
            total += float(err[j])
            effs[kind] = float(EFFICIENCY_GRID[j])
        if total < best[0]:
            best = (total, effs, float(o))
    n = sum(len(r) for r in kinds.values())
    return best[1], best[2], math.sqrt(best[0] / n)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties broken by order)."""
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def fidelity(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    """predicted_s, spearman, mape (%) and within_10pct (share within +-10%) of predictions."""
    pred, meas = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    err = np.abs(pred - meas) / meas
    return {"predicted_s": pred.tolist(), "spearman": spearman(pred, meas), "mape": float(100 * err.mean()),
            "within_10pct": float((err <= 0.10).mean())}


__all__ = ["EFFICIENCY_GRID", "fidelity", "fit_roofline", "spearman"]
