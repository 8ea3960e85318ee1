"""Peer benchmark: mpsearch's budgeted mixed-precision search against Sony's Model Compression
Toolkit (MCT) mixed-precision PTQ on torchvision MobileNetV2, both tools' choices scored by
mpsearch's own quantizer on the same evaluation crops, in one process.

    PYTHONPATH=. .venv/bin/python benchmarks/peers.py [--quick] [--json PATH] [--mct-python PATH]
        [--trials N] [--budgets 0.75,0.6] [--heldout N]

The space: weights int8/int4/int2 per layer, activations int8 (a layer whose input has no
module to hook keeps fp32 activations, as in every mpsearch search: none on mobilenet_v2), for
every conv/linear (53 layers: 52 conv + 1 linear). Budgets are fractions of the all-int8 weight payload: the kernel elements x 1
byte, biases and quantization scales not counted (MCT's weights memory; mpsearch's
size_budget_mb="<b*100>%int8" with weight_bytes="payload").

MCT (no dependency of mpsearch) runs in its own venv (benchmarks/peers_venv.sh, which reuses
mpsearch's torch) as a subprocess: benchmarks/peers_mct.py, on the task's calibration crops
(--quick: the first 32 of the 128), with MCT's default IMX500 TPC (kernels 8/4/2 bits, activations
8 bits), its default MixedPrecisionQuantizationConfig and ResourceUtilization(weights_memory=b x
int8 kernel bytes), one pytorch_post_training_quantization call per budget (its public API shares
no work between budgets). Its wall time is the whole subprocess: interpreter start, imports, model
load and every budget.

mpsearch: `mpsearch.search("mobilenet_v2", "x86-vnni", ...)` per budget, default strategy (hybrid),
n_trials=--trials (default 40; --quick 12), seed 0, no tracking, with MPSEARCH_CACHE_DIR pointed at
a fresh directory (holding only a copy of the task's generated crops): the first budget builds the
evaluator and the layer sensitivities from scratch, later budgets reuse them, as MCT's first
budget carries its one-time work. Its best trial (result.best: the most accurate within the budget)
is its choice; its wall time is the search() call.

Scoring: one Evaluator (mpsearch.scoring.evaluator, default QuantSettings, no cache) scores both
choices and uniform int8 on the task's 256 evaluation crops: top-1 agreement with FP32 and the KL
divergence of the output distribution to FP32's, with 95% confidence intervals. mpsearch's choice
is re-scored by it (the same number as in its search: checked). mpsearch chose on these crops;
MCT never saw them. So a second Evaluator (the same calibration crops: the same quantizer) scores
them again on --heldout crops neither tool saw (default 1024): drawn as the task draws its
evaluation set (mobilenet.draw_confident_crops: the margin rule, at most twice a fair share per
photo), with seed HELDOUT_SEED.

Paired verdict, per budget and crop set (the goal's "metric, then KL", with the issue's rule that
differences within the evaluation set's noise go to the finer proxy): top-1 decides when the crops
only one choice gets right are unbalanced beyond chance (exact McNemar test, p < 0.05); else KL
decides when the 95% CI of the mean per-crop difference excludes 0; else it is a tie.

--quick: budget 0.75 only, mpsearch 12 trials, MCT on 32 calibration crops, 256 held-out crops.

JSON keys:
  cpu               this machine (mpsearch.host.cpu_info)
  task, target, quick, trials, fractions
  layers            number of quantizable layers; int8_payload_bytes: the all-int8 weight payload
  mct               {"python", "version", "wall_s" (the whole subprocess, own_eval_s included),
                    "own_eval_s" (scoring MCT's own quantized models, see own_top1), "setup_s" (its
                    imports, model, TPC), "calib_images", "tpc", "mp_config", "reuse",
                    "int8_kernel_bytes" (MCT's 100 %, equal to int8_payload_bytes)}
  mpsearch          {"version", "cold_cache" (the fresh MPSEARCH_CACHE_DIR's role), "strategy"}
  scoring           {"evaluator_s" (building the scoring evaluator), "eval_samples", "fp32_act_layers",
                    "int8": the uniform-int8 reference, as a choice below without bits,
                    "heldout": null (--heldout 0) or {"seed", "draw_s" (drawing the crops),
                    "evaluator_s", "eval_samples", "int8"}}
  budgets           one per fraction:
      fraction, allowed_bytes (fraction x int8_payload_bytes)
      mct, mpsearch     each tool's choice:
          bits          {fqn: weight bits}
          counts        {"8": n, "4": n, "2": n}
          payload_bytes sum over layers of ceil(elements x bits / 8) (hw_models.cost.weight_bytes
                        "payload"); used_fraction = payload_bytes / int8_payload_bytes
          within_budget payload_bytes <= allowed_bytes
          top1, top1_ci [low, high], kl, kl_ci    scored by mpsearch's evaluator
          seconds       MCT: its pytorch_post_training_quantization call for this budget (the first
                        one does not include the subprocess start; see mct.wall_s);
                        mpsearch: the search() call
      mct also: mct_weights_memory (MCT's own count of its choice), activation_bits ({bits: number
                    of MCT's activation quantizers}: all 8), own_top1 (MCT's own quantized model,
                    with its thresholds and corrections, on the same 256 crops: context, not the
                    comparison, which uses mpsearch's quantizer for both)
      mpsearch also: trial (result.best), search_top1 (the metric in the search, = top1),
                    trials_run, cache ("cold" or "warm"), timing (result.timing: sensitivity,
                    ILP, sampler, pricing, scoring seconds)
      paired            mpsearch's choice against MCT's on the search's crops: only_mct_right,
                        only_mpsearch_right (crops), mcnemar_p, kl_diff (mean per-crop KL, mpsearch
                        minus MCT), kl_diff_ci [low, high], verdict ("mpsearch", "MCT" or "tie"),
                        decided_by ("top-1", "KL" or "neither"); null without a choice of mpsearch
      heldout           (unless --heldout 0) {"mct", "mpsearch": each choice's bits, counts, payload,
                        top1, top1_ci, kl, kl_ci on the held-out crops, "paired": as above}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import mpsearch
from hw_models import Candidate, LayerChoice, Precision
from hw_models.cost import weight_bytes
from mpsearch import metrics
from mpsearch.cache import cache_dir
from mpsearch.host import cpu_info
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import Evaluator
from mpsearch.tasks import load_task, mobilenet
from mpsearch.tasks.weights import mobilenet_v2_weights_path

HERE = Path(__file__).resolve().parent
TASK = "mobilenet_v2"
TARGET = "x86-vnni"
WEIGHTS = ("int8", "int4", "int2")
ACTIVATIONS = ("int8",)
QUICK_CALIB = 32
HELDOUT_SEED = 3  # the task draws calibration crops with seed 1, evaluation crops with 2
HELDOUT = 1024  # held-out crops (--quick: 256)
ALPHA = 0.05  # paired tests: a difference below this p-value (top-1) or outside the 95% CI (KL) decides


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- scoring (both tools alike)

def fp32_act_layers(analysis) -> set[str]:
    """Layers reading the model's input: their activations stay fp32 in mpsearch's space."""
    return {f for f, h in analysis.handles.items() if h.input_module is None}


def bits_candidate(analysis, bits: dict[str, int]) -> Candidate:
    """{fqn: weight bits} -> a Candidate over every layer: int<bits> weights, int8 activations
    (fp32 for the layers reading the model's input, as mpsearch's space has them)."""
    missing = [f for f in analysis.fqns if f not in bits]
    extra = [f for f in bits if f not in set(analysis.fqns)]
    if missing or extra:
        raise SystemExit(f"peers: configuration does not match the model's layers: missing {missing[:3]}, "
                         f"unknown {extra[:3]}")
    fp32 = fp32_act_layers(analysis)
    return Candidate((f, LayerChoice(Precision.parse(f"int{bits[f]}"),
                                     Precision.FP32 if f in fp32 else Precision.INT8)) for f in analysis.fqns)


def payload_bytes(analysis, cand: Candidate) -> int:
    return sum(weight_bytes(layer, cand[layer.fqn].weight, "payload") for layer in analysis.layers)


def score_choice(ev: Evaluator, analysis, cand: Candidate, int8_bytes: int, allowed: float | None) -> dict:
    """What the table and the JSON say about one configuration on ev's crops; "_per_crop" (taken
    out before the JSON is written): (right or not, KL to FP32) per crop, for the paired tests."""
    outputs = ev.outputs(cand)
    targets = [t for _, t in ev.task.eval_batches]
    top1 = metrics.accuracy(outputs, targets)
    kl = metrics.kl_per_sample(outputs, ev.reference_outputs)
    intervals = ev.intervals(outputs, top1, kl)
    used = payload_bytes(analysis, cand)
    counts = Counter(c.weight.bits for c in cand.values())
    return {"bits": {f: c.weight.bits for f, c in cand.items()},
            "counts": {str(k): counts.get(k, 0) for k in (8, 4, 2)},
            "payload_bytes": used, "used_fraction": used / int8_bytes,
            "within_budget": None if allowed is None else used <= allowed,
            "top1": top1, "top1_ci": list(intervals["metric"]), "kl": float(kl.mean()),
            "kl_ci": list(intervals["kl_to_fp32"]),
            "_per_crop": (torch.cat(outputs).argmax(dim=1) == torch.cat(targets), kl)}


def sign_test_p(a: int, b: int) -> float:
    """Exact two-sided McNemar p-value: a crops only one configuration gets right, b only the other."""
    n, k = a + b, min(a, b)
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired(mct: dict, mps: dict) -> dict:
    """mpsearch's choice against MCT's on the same crops, the goal's "metric, then KL" with the
    issue's rule for differences within the set's noise: top-1 decides where the crops only one
    of them gets right differ beyond chance (exact McNemar p < ALPHA), else the KL decides where
    the 95% CI of the mean per-crop difference excludes 0, else neither is better on these crops."""
    (right_c, kl_c), (right_s, kl_s) = mct["_per_crop"], mps["_per_crop"]
    only_mct, only_mps = int((right_c & ~right_s).sum()), int((right_s & ~right_c).sum())
    p = sign_test_p(only_mct, only_mps)
    d = (kl_s - kl_c).double()
    mean, se = float(d.mean()), metrics.standard_error(d.tolist()) or 0.0
    lo, hi = mean - metrics.Z95 * se, mean + metrics.Z95 * se
    if p < ALPHA:
        verdict, by = ("mpsearch" if only_mps > only_mct else "MCT"), "top-1"
    elif hi < 0 or lo > 0:
        verdict, by = ("mpsearch" if hi < 0 else "MCT"), "KL"
    else:
        verdict, by = "tie", "neither"
    return {"only_mct_right": only_mct, "only_mpsearch_right": only_mps, "mcnemar_p": p,
            "kl_diff": mean, "kl_diff_ci": [lo, hi], "verdict": verdict, "decided_by": by}


def heldout_task(task, size: int):
    """The task with `size` margin-filtered crops drawn with HELDOUT_SEED as its evaluation set:
    crops neither tool saw (the same calibration crops, so the same quantizer)."""
    _, images, labels, _ = mobilenet.draw_confident_crops(task.model, mobilenet.photo_tensors(), size, HELDOUT_SEED)
    return dataclasses.replace(task, eval_batches=mobilenet.labelled_batches(images, labels), fp32_metric=1.0)


def judge(task, analysis, fractions, mct, searches, int8_bytes) -> dict:
    """Both tools' choices and uniform int8 scored on `task`'s crops, and the paired verdicts."""
    t = time.perf_counter()
    ev = Evaluator(task, analysis, cache_dir=None)
    evaluator_s = time.perf_counter() - t
    try:
        int8 = score_choice(ev, analysis, bits_candidate(analysis, {f: 8 for f in analysis.fqns}), int8_bytes, None)
        rows = []
        for b, per, srch in zip(fractions, mct["budgets"], searches, strict=True):
            allowed = b * int8_bytes
            m = score_choice(ev, analysis, bits_candidate(analysis, per["bits"]), int8_bytes, allowed)
            s = score_choice(ev, analysis, srch["config"], int8_bytes, allowed) if srch["config"] is not None else {}
            rows.append({"mct": m, "mpsearch": s, "paired": paired(m, s) if s else None})
    finally:
        ev.close()
    for c in [int8] + [r[k] for r in rows for k in ("mct", "mpsearch")]:
        c.pop("_per_crop", None)
    del int8["bits"]
    return {"evaluator_s": evaluator_s, "eval_samples": metrics.n_eval_samples(task.eval_batches),
            "int8": int8, "budgets": rows}


# ---------------------------------------------------------------- MCT (its own venv)

def mct_python(given: str | None) -> str:
    if given:
        return given
    script = HERE / "peers_venv.sh"
    log(f"MCT venv: {script}")
    proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True, check=False,
                          env={**os.environ, "MPSEARCH_PYTHON": sys.executable})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"peers: {script} failed (exit {proc.returncode})")
    return lines[-1]


def run_mct(python: str, calib: list[torch.Tensor], evals: list, fractions: list[float],
            tmp: Path) -> tuple[dict, float]:
    """peers_mct.py in the MCT venv; (its JSON, wall seconds of the whole subprocess). `evals`:
    (inputs, labels) batches MCT's own quantized model is scored on (timed apart)."""
    inp, out, logf = tmp / "mct-input.pt", tmp / "mct.json", tmp / "mct.log"
    torch.save({"calib": calib, "budgets": fractions, "weights_path": str(mobilenet_v2_weights_path()),
                "eval": evals}, inp)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MPSEARCH_CACHE_DIR")}
    cmd = [python, str(HERE / "peers_mct.py"), str(inp), "--out", str(out)]
    log(f"MCT: {' '.join(cmd)}")
    t = time.perf_counter()
    with open(logf, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    wall = time.perf_counter() - t
    text = logf.read_text(errors="replace").splitlines()
    for line in text:
        if line.startswith("peers_mct:"):
            log("  " + line)
    if proc.returncode != 0 or not out.is_file():
        log("\n".join(text[-40:]))
        raise SystemExit(f"peers: MCT failed (exit {proc.returncode}); its log: {logf}")
    return json.loads(out.read_text()), wall


# ---------------------------------------------------------------- mpsearch

def run_mpsearch(fraction: float, trials: int, out: Path) -> tuple[dict, float]:
    t = time.perf_counter()
    result = mpsearch.search(
        TASK, TARGET, n_trials=trials, seed=0, weight_precisions=WEIGHTS, activation_precisions=ACTIVATIONS,
        size_budget_mb=f"{round(fraction * 100)}%int8", weight_bytes="payload", out_dir=out, track=False,
        progress=False)
    seconds = time.perf_counter() - t
    best = result.best
    rec = result.trial(best) if best is not None else None
    return {"trial": best, "config": rec.config if rec else None, "search_top1": rec.metric if rec else None,
            "trials_run": len(result.trials), "timing": result.timing,
            "strategy": result.settings.get("strategy")}, seconds


# ---------------------------------------------------------------- report

def fmt_choice(c: dict | None, allowed: float) -> str:
    if c is None:
        return "no feasible trial"
    lo, hi = c["top1_ci"]
    counts = c["counts"]
    return (f"{c['top1']:.3f} [{lo:.2f},{hi:.2f}]  KL {c['kl']:.4f}  {counts['8']}/{counts['4']}/{counts['2']}  "
            f"{c['payload_bytes'] / 1000:.0f}/{allowed / 1000:.0f} KB")


def fmt_paired(p: dict | None) -> str:
    if p is None:
        return "no choice to compare"
    lo, hi = p["kl_diff_ci"]
    return (f"{p['only_mct_right']:>3} / {p['only_mpsearch_right']:<3} p {p['mcnemar_p']:.2f} | "
            f"{p['kl_diff']:+.4f} [{lo:+.4f},{hi:+.4f}] | {p['verdict']}"
            + (f" (by {p['decided_by']})" if p["verdict"] != "tie" else ""))


def print_table(out: dict) -> None:
    sc, held = out["scoring"], out["scoring"].get("heldout")
    print(f"\nmobilenet_v2 on {out['target']}: {out['layers']} layers, int8 weight payload "
          f"{out['int8_payload_bytes'] / 1000:.0f} KB; scored by mpsearch on its search's {sc['eval_samples']} "
          f"crops (top-1 agreement with FP32 [95% CI], KL to FP32, layers at 8/4/2 bits, payload used/allowed)")
    i8 = sc["int8"]
    print(f"uniform int8: {i8['top1']:.3f} [{i8['top1_ci'][0]:.2f},{i8['top1_ci'][1]:.2f}]  KL {i8['kl']:.4f}")
    head = f"{'budget':>6} | {'MCT ' + out['mct']['version'] + ' bits':<52} | {'mpsearch':<52} | wall s MCT vs mpsearch"
    print(head)
    print("-" * len(head))
    for row in out["budgets"]:
        m, s = row["mct"], row["mpsearch"]
        print(f"{row['fraction']:>6.2f} | {fmt_choice(m, row['allowed_bytes']):<52} | "
              f"{fmt_choice(s if s.get('bits') else None, row['allowed_bytes']):<52} | "
              f"{m['seconds']:.0f} vs {s['seconds']:.0f} ({s['cache']} cache)")
    own = ", ".join(f"{r['fraction']:g}: {r['mct']['own_top1']:.3f}" for r in out["budgets"]
                    if r["mct"].get("own_top1") is not None)
    print(f"MCT subprocess wall {out['mct']['wall_s']:.0f} s in all (setup {out['mct']['setup_s']:.0f} s, "
          f"scoring its own models {out['mct']['own_eval_s']:.0f} s, calibration {out['mct']['calib_images']} "
          f"crops); mpsearch {out['trials']} trials per budget")
    if own:
        print(f"MCT's own quantized models (its thresholds and corrections), top-1 agreement: {own}")
    if held:
        print(f"\nthe same choices on {held['eval_samples']} held-out crops neither tool saw (seed {held['seed']}, "
              f"the same margin rule); uniform int8: {held['int8']['top1']:.3f} KL {held['int8']['kl']:.4f}")
        print(head.rsplit(" | ", 1)[0].rstrip())
        print("-" * len(head))
        for row in out["budgets"]:
            h = row["heldout"]
            print(f"{row['fraction']:>6.2f} | {fmt_choice(h['mct'], row['allowed_bytes']):<52} | "
                  f"{fmt_choice(h['mpsearch'] or None, row['allowed_bytes'])}")
    print(f"\npaired, mpsearch against MCT: crops only MCT / only mpsearch gets right (exact McNemar p); "
          f"KL mpsearch - MCT per crop, mean [95% CI]; verdict: top-1 where p < {ALPHA}, else KL where its CI "
          f"excludes 0, else a tie")
    for row in out["budgets"]:
        print(f"{row['fraction']:>6.2f} {'search crops':>13} | {fmt_paired(row['paired'])}")
        if held:
            print(f"{'':>6} {'held-out':>13} | {fmt_paired(row['heldout']['paired'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="budget 0.75, 12 trials, MCT on 32 calibration crops")
    ap.add_argument("--json")
    ap.add_argument("--mct-python", help="the MCT venv's python (default: benchmarks/peers_venv.sh's)")
    ap.add_argument("--trials", type=int, default=None, help="mpsearch trials per budget (default 40; --quick 12)")
    ap.add_argument("--budgets", default=None, help="fractions of the int8 weight payload (default 0.75,0.6)")
    ap.add_argument("--heldout", type=int, default=None,
                    help=f"held-out crops to judge both choices on as well (default {HELDOUT}; --quick 256; 0: none)")
    args = ap.parse_args()
    trials = args.trials or (12 if args.quick else 40)
    if args.heldout is None:
        args.heldout = 256 if args.quick else HELDOUT
    if args.heldout < 0:
        raise SystemExit("peers: --heldout must be 0 or more")
    fractions = [float(x) for x in (args.budgets or ("0.75" if args.quick else "0.75,0.6")).split(",")]
    cpu = cpu_info()
    log(f"cpu: {cpu.get('cpu')} ({', '.join(cpu.get('features', [])) or 'no int8 features'}), "
        f"{cpu.get('cores')} cores")

    python = mct_python(args.mct_python)
    task = load_task(TASK)
    analysis = analyze(task.model, task.example_input)
    int8_bytes = payload_bytes(analysis, Candidate.uniform(analysis.fqns, Precision.INT8, Precision.INT8))
    log(f"{TASK}: {len(analysis.fqns)} layers, int8 weight payload {int8_bytes} bytes")
    calib = list(task.calib_batches)
    if args.quick:
        calib = list(torch.cat(calib)[:QUICK_CALIB].split(16))

    with tempfile.TemporaryDirectory(prefix="mpsearch-peers-") as tmp_name:
        tmp = Path(tmp_name)
        mct, mct_wall = run_mct(python, calib, list(task.eval_batches), fractions, tmp)
        if mct["int8_kernel_bytes"] != int8_bytes:
            log(f"warning: MCT's int8 kernel bytes {mct['int8_kernel_bytes']} != mpsearch's payload {int8_bytes}")

        # mpsearch with cold caches: a fresh cache directory holding only the task's generated crops
        cold = tmp / "cache"
        shutil.copytree(cache_dir("tasks", TASK), cold / "tasks" / TASK)
        before = os.environ.get("MPSEARCH_CACHE_DIR")
        os.environ["MPSEARCH_CACHE_DIR"] = str(cold)
        searches = []
        try:
            for i, b in enumerate(fractions):
                log(f"mpsearch: budget {b:g}, {trials} trials ({'cold' if i == 0 else 'warm'} cache)")
                res, seconds = run_mpsearch(b, trials, tmp / f"search-{i}")
                res.update(seconds=seconds, cache="cold" if i == 0 else "warm")
                searches.append(res)
                log(f"  {seconds:.1f} s, best trial {res['trial']} (top-1 {res['search_top1']})")
        finally:
            if before is None:
                os.environ.pop("MPSEARCH_CACHE_DIR", None)
            else:
                os.environ["MPSEARCH_CACHE_DIR"] = before

    log(f"scoring both tools' choices with mpsearch's evaluator on the search's {metrics.n_eval_samples(task.eval_batches)} crops")
    search_set = judge(task, analysis, fractions, mct, searches, int8_bytes)
    heldout, heldout_s = None, 0.0
    if args.heldout:
        log(f"drawing {args.heldout} held-out crops (seed {HELDOUT_SEED}) and scoring the choices on them")
        t = time.perf_counter()
        held = heldout_task(task, args.heldout)
        heldout_s = time.perf_counter() - t
        heldout = judge(held, analysis, fractions, mct, searches, int8_bytes)
        heldout.update(seed=HELDOUT_SEED, draw_s=heldout_s)
    rows = []
    for i, (b, per, srch) in enumerate(zip(fractions, mct["budgets"], searches, strict=True)):
        m, s = search_set["budgets"][i]["mct"], search_set["budgets"][i]["mpsearch"]
        m.update(seconds=per["seconds"], mct_weights_memory=per["mct_weights_memory"],
                 activation_bits=per["activation_bits"], own_top1=per["own_top1"])
        if s and srch["search_top1"] is not None and abs(s["top1"] - srch["search_top1"]) > 1e-9:
            log(f"warning: mpsearch's choice re-scored {s['top1']} != {srch['search_top1']} in its search")
        s.update({k: srch[k] for k in ("trial", "search_top1", "trials_run", "cache", "timing", "seconds")})
        row = {"fraction": b, "allowed_bytes": b * int8_bytes, "mct": m, "mpsearch": s,
               "paired": search_set["budgets"][i]["paired"]}
        if heldout is not None:
            row["heldout"] = heldout["budgets"][i]
        rows.append(row)
    if heldout is not None:
        del heldout["budgets"]

    out = {
        "cpu": cpu, "task": TASK, "target": TARGET, "quick": args.quick, "trials": trials, "fractions": fractions,
        "layers": len(analysis.fqns), "int8_payload_bytes": int8_bytes,
        "mct": {"python": python, "version": mct["mct_version"], "wall_s": mct_wall,
                "own_eval_s": sum(p["own_eval_s"] or 0.0 for p in mct["budgets"]), "setup_s": mct["setup_s"],
                "calib_images": mct["calib_images"], "tpc": mct["tpc"], "mp_config": mct.get("mp_config"),
                "reuse": mct["reuse"], "int8_kernel_bytes": mct["int8_kernel_bytes"]},
        "mpsearch": {"version": getattr(mpsearch, "__version__", None), "strategy": searches[0]["strategy"],
                     "cold_cache": "MPSEARCH_CACHE_DIR: a fresh directory for the first budget (evaluator and "
                                   "sensitivities built from scratch), reused by the later ones"},
        "scoring": {"evaluator_s": search_set["evaluator_s"], "eval_samples": search_set["eval_samples"],
                    "fp32_act_layers": sorted(fp32_act_layers(analysis)), "int8": search_set["int8"],
                    "heldout": heldout},
        "budgets": rows,
    }
    print_table(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
