"""Sony Model Compression Toolkit (MCT) mixed-precision PTQ of torchvision MobileNetV2, for the
peer benchmark (benchmarks/peers.py). Runs INSIDE the MCT venv (benchmarks/peers_venv.sh), never
in mpsearch's: it imports neither mpsearch nor anything MCT does not need.

    $(benchmarks/peers_venv.sh) benchmarks/peers_mct.py INPUT.pt --out OUT.json [--threads N] [--hessian]

INPUT.pt (torch.save): {"calib": [float NCHW tensors, already normalized, one per calibration batch],
"budgets": [fractions such as 0.75, 0.6], "weights_path": the IMAGENET1K_V1 state dict file}, and
optionally "eval": [(inputs, labels) batches]: then MCT's own quantized model (its thresholds, its
bias correction) is scored on them too (top-1 agreement with the labels), timed apart.

Model: `torchvision.models.mobilenet_v2()` with that state dict, eval mode (no hub download).
MCT setup, all public API (`mct.ptq.pytorch_post_training_quantization`): the default target
platform capabilities `mct.get_target_platform_capabilities("1.0", "imx500")`, whose
conv/depthwise/linear kernels have the mixed-precision candidates 8/4/2 bits (symmetric,
per-channel) and whose activations are 8 bits only (power-of-two thresholds); MCT's default
`MixedPrecisionQuantizationConfig()` (sensitivity: distance of interest-point activations between
the float and the mixed-precision model on num_of_images=32 calibration images, averaged over the
interest points, no Hessian weighting; --hessian sets use_hessian_based_scores=True), then MCT's
ILP over the per-layer candidates under `ResourceUtilization(weights_memory=b x int8 kernel bytes)`.

Weight memory as MCT counts it (ResourceUtilizationCalculator, TargetInclusionCriterion.
AnyQuantizedNonFused): the elements of every quantized weight attribute x its bits / 8; with this
TPC only the kernels are quantized (biases stay float and are not counted), so the all-8-bit
reference is the number of conv/linear kernel elements, in bytes. Batch norms are folded into the
convolutions first, which leaves the kernels' sizes unchanged.

Chosen bits are read back from the returned model: every `mct_quantizers.PytorchQuantizationWrapper`
(a module named after MCT's graph node) holds weights_quantizers[attr].num_bits. MCT's node names
are torch.fx node names (module path with "." -> "_"; a convolution whose batch norm was folded
into it gets the suffix "_bn"); they are mapped back to module names through
a torch.fx trace of the same model, and every nn.Conv2d / nn.Linear of the model must be covered
exactly once, with the same kernel size (else the script fails).

Reuse between budgets: none that the public API allows. Each pytorch_post_training_quantization
call rebuilds the graph, collects the calibration statistics, computes the thresholds and measures
every layer's sensitivity again before its ILP; only imports, the model and the TPC object are
shared. So every budget's seconds include the whole pipeline ("reuse" in the JSON says so).

Output JSON (--out):
  mct_version, torch_version, torchvision_version, threads
  tpc                {"name", "version", "platform", "weight_candidates", "activation_bits"}
  mp_config          MixedPrecisionQuantizationConfig fields as used (enums by name)
  calib_images, calib_batches
  layers             {fqn: kernel elements}, every conv/linear in execution order
  int8_kernel_bytes  sum of kernel elements (all kernels at 8 bits), MCT's 100 %
  setup_s            imports, model and TPC construction (before the first budget)
  reuse              what is shared between budgets (see above)
  budgets            one per fraction, in the given order:
      fraction, target_bytes (fraction x int8_kernel_bytes)
      bits           {fqn: weight bits chosen by MCT}
      counts         {"8": n, "4": n, "2": n}
      kernel_bytes   sum over layers of elements x bits / 8 (from bits)
      mct_weights_memory   MCT's own final weights memory (user_info.final_resource_utilization)
      activation_bits      {bits: number of activation quantizers at that width}
      node_to_fqn          {MCT node name: fqn} for the wrapped layers
      seconds        wall seconds of the pytorch_post_training_quantization call
      own_top1, own_eval_s  with "eval" given: MCT's quantized model's top-1 agreement with the
                     labels, and the seconds that took (not part of `seconds`)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import Counter
from dataclasses import fields
from enum import Enum

T0 = time.perf_counter()

import model_compression_toolkit as mct
import torch
import torchvision
from mct_quantizers import PytorchActivationQuantizationHolder, PytorchQuantizationWrapper

TPC_VERSION = "1.0"
TPC_DEVICE = "imx500"


def log(msg: str) -> None:
    print(f"peers_mct: {msg}", file=sys.stderr, flush=True)


def kernel_layers(model: torch.nn.Module) -> dict[str, int]:
    """{fqn: kernel elements} of every conv / linear, in module order."""
    return {name: m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d | torch.nn.Linear)}


def fx_names(model: torch.nn.Module) -> dict[str, str]:
    """torch.fx node name -> module path, for call_module nodes (MCT names its graph nodes so)."""
    gm = torch.fx.symbolic_trace(model)
    return {n.name: str(n.target) for n in gm.graph.nodes if n.op == "call_module"}


def read_bits(qmodel: torch.nn.Module, names: dict[str, str], layers: dict[str, int]) -> tuple[dict, dict, Counter]:
    """({fqn: bits}, {node: fqn}, activation bit counts) of MCT's returned model; fails unless every
    conv/linear of `layers` is covered exactly once with its kernel size."""
    bits: dict[str, int] = {}
    node_to_fqn: dict[str, str] = {}
    act = Counter()
    problems = []
    for name, m in qmodel.named_modules():
        if isinstance(m, PytorchActivationQuantizationHolder):
            act[int(m.activation_holder_quantizer.num_bits)] += 1
        if not isinstance(m, PytorchQuantizationWrapper):
            continue
        # batch-norm folding renames the convolution's node to "<node>_bn" (MCT's BatchNormalizationFolding)
        fqn = names.get(name) or (names.get(name[:-3]) if name.endswith("_bn") else None)
        if fqn is None or fqn not in layers:
            problems.append(f"node {name} maps to no conv/linear ({fqn})")
            continue
        if fqn in bits:
            problems.append(f"{fqn} covered twice (node {name} and an earlier one)")
            continue
        qs = dict(m.weights_quantizers)
        if set(qs) - {"weight"}:
            problems.append(f"node {name} quantizes {sorted(map(str, qs))}, not only its kernel")
        q = qs.get("weight")
        if q is None:
            problems.append(f"node {name} has no kernel quantizer")
            continue
        elems = m.layer.weight.numel()
        if elems != layers[fqn]:
            problems.append(f"node {name} -> {fqn}: {elems} kernel elements, the model's layer has {layers[fqn]}")
        bits[fqn] = int(q.num_bits)
        node_to_fqn[name] = fqn
    missing = [f for f in layers if f not in bits]
    if missing:
        problems.append(f"{len(missing)} conv/linear layers without MCT bits: {missing[:5]}")
    if problems:
        raise SystemExit("peers_mct: layer mapping failed:\n  " + "\n  ".join(problems))
    return {f: bits[f] for f in layers}, node_to_fqn, act


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output (MCT's built models may return a one-element list)."""
    out = model(x)
    return out[0] if isinstance(out, list | tuple) else out


def jsonable(v):
    if isinstance(v, Enum):
        return v.name
    if callable(v):
        return getattr(v, "__name__", repr(v))
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", help="the .pt file: calib, budgets, weights_path")
    ap.add_argument("--out", required=True, help="where the JSON goes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--hessian", action="store_true", help="MCT's Hessian-weighted sensitivity instead of its default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = torch.load(args.input, map_location="cpu", weights_only=True)
    calib = [t.float().contiguous() for t in data["calib"]]
    budgets = [float(b) for b in data["budgets"]]
    evals = [(x.float().contiguous(), y) for x, y in data.get("eval", [])]
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(data["weights_path"], map_location="cpu", weights_only=True))
    model.eval()

    layers = kernel_layers(model)
    int8_bytes = sum(layers.values())
    names = fx_names(model)
    n_conv = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    n_lin = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    log(f"mobilenet_v2: {len(layers)} quantizable layers ({n_conv} conv, {n_lin} linear), "
        f"{int8_bytes} kernel elements = {int8_bytes} bytes at 8 bits (MCT's 100 %)")

    def representative_data_gen():
        for batch in calib:
            yield [batch]

    tpc = mct.get_target_platform_capabilities(tpc_version=TPC_VERSION, device_type=TPC_DEVICE)
    mp_kwargs = {"use_hessian_based_scores": True} if args.hessian else {}
    n_images = sum(b.shape[0] for b in calib)
    setup_s = time.perf_counter() - T0
    log(f"MCT {mct.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{n_images} calibration images in {len(calib)} batches; setup {setup_s:.1f} s")

    out = {"mct_version": mct.__version__, "torch_version": torch.__version__,
           "torchvision_version": torchvision.__version__, "threads": torch.get_num_threads(),
           "tpc": {"name": tpc.name, "version": TPC_VERSION, "platform": TPC_DEVICE,
                   "weight_candidates": [8, 4, 2], "activation_bits": [8]},
           "calib_images": n_images, "calib_batches": len(calib), "layers": layers,
           "int8_kernel_bytes": int8_bytes, "setup_s": setup_s,
           "reuse": "none: the public API (mct.ptq.pytorch_post_training_quantization) reruns graph preparation, "
                    "statistics collection, threshold selection and the per-layer sensitivity measurement for "
                    "every budget; only imports, the model and the TPC are shared",
           "budgets": []}
    for b in budgets:
        mp_config = mct.core.MixedPrecisionQuantizationConfig(**mp_kwargs)
        out["mp_config"] = {f.name: jsonable(getattr(mp_config, f.name)) for f in fields(mp_config)
                            if not f.name.startswith("_")}
        core_config = mct.core.CoreConfig(mixed_precision_config=mp_config)
        target = b * int8_bytes
        ru = mct.core.ResourceUtilization(weights_memory=target)
        log(f"budget {b:g}: weights memory <= {target:.0f} bytes")
        t = time.perf_counter()
        qmodel, info = mct.ptq.pytorch_post_training_quantization(
            copy.deepcopy(model), representative_data_gen, target_resource_utilization=ru, core_config=core_config,
            target_platform_capabilities=tpc)
        seconds = time.perf_counter() - t
        bits, node_to_fqn, act = read_bits(qmodel, names, layers)
        used = sum(layers[f] * bits[f] / 8 for f in layers)
        final = getattr(info, "final_resource_utilization", None)
        mct_mem = float(final.weights_memory) if final is not None else None
        counts = Counter(bits.values())
        own_top1 = own_eval_s = None
        if evals:
            t = time.perf_counter()
            qmodel.eval()
            with torch.no_grad():
                hits = sum(int((logits(qmodel, x).argmax(dim=1) == y).sum()) for x, y in evals)
            own_top1 = hits / sum(len(y) for _, y in evals)
            own_eval_s = time.perf_counter() - t
            log(f"budget {b:g}: MCT's own quantized model agrees with the labels on {own_top1:.3f} "
                f"({own_eval_s:.1f} s)")
        log(f"budget {b:g}: {seconds:.1f} s; {counts[8]}/{counts[4]}/{counts[2]} layers at 8/4/2 bits, "
            f"{used:.0f} kernel bytes ({used / int8_bytes:.1%} of int8; MCT's count {mct_mem}); "
            f"activation quantizers {dict(act)}")
        out["budgets"].append({
            "fraction": b, "target_bytes": target, "bits": bits,
            "counts": {str(k): counts.get(k, 0) for k in (8, 4, 2)}, "kernel_bytes": used,
            "mct_weights_memory": mct_mem, "activation_bits": {str(k): v for k, v in sorted(act.items())},
            "node_to_fqn": node_to_fqn, "seconds": seconds, "own_top1": own_top1, "own_eval_s": own_eval_s})
        with open(args.out, "w") as f:  # after every budget: a crash keeps what was done
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
