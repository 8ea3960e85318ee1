"""Command-line interface. Parses arguments and calls the API; no logic of its own.

User errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpsearch.errors import InvalidConfigError, MpsearchError, SearchInterrupted

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    what = "a positive integer" if low == 1 else f"an integer of at least {low}"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_natural_int = _int_at_least(0)


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpsearch", description="Mixed-precision quantization search.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("tasks", help="list built-in tasks")
    sub.add_parser("targets", help="list hardware targets")
    sub.add_parser("fetch-weights", help="fetch the pretrained weights built-in tasks need")

    pr = sub.add_parser("profile", help="per-layer cost table of a configuration on a target")
    pr.add_argument("--task", required=True, help="built-in name, package.module:function or file.py:function")
    pr.add_argument("--target", default="x86-vnni", help="hardware target or profile file (.toml)")
    how = pr.add_mutually_exclusive_group()
    how.add_argument("--precision", default="fp32", metavar="P",
                     help="every layer at P (int8, fp32, ...) or WEIGHT/ACT (int4/int8); default fp32")
    how.add_argument("--config", metavar="FILE", help="per-layer precisions: JSON {layer: {weight, activation}}")
    pr.add_argument("--batch-size", type=_positive_int, default=1, help="batch size (default 1)")

    c = sub.add_parser("calibrate", help="measure this machine and write a fitted profile (.toml)")
    c.add_argument("--task", required=True, help="built-in name, package.module:function or file.py:function")
    c.add_argument("--target", default="x86-vnni",
                   help="the profile to fit: a CPU profile (ONNX Runtime) or a GPU one such as h100 (needs "
                        "CUDA); default x86-vnni")
    c.add_argument("--out", required=True, metavar="FILE.toml", help="where to write the profile")
    c.add_argument("--name", help="the new profile's name (default <target>-calibrated)")
    c.add_argument("--threads", type=_positive_int, help="CPU: intra-op threads (default: the profile's)")
    c.add_argument("--batch-size", type=_positive_int, default=1, help="batch size measured (default 1)")
    c.add_argument("--mixed", type=int, default=40, metavar="N",
                   help="CPU: random mixed configurations timed end to end (default 40)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-progress", action="store_true")

    _add_search_options(sub.add_parser("search", help="search per-layer precisions for a task on a target"))
    _add_search_options(sub.add_parser("compare", help="one search, priced and compared on several targets"),
                        compare=True)

    ex = sub.add_parser("export", help="a trial's per-layer precisions as a config file (or an ONNX QDQ model)")
    ex.add_argument("dir", metavar="DIR", help="the output directory of a search (its result.json)")
    ex.add_argument("--trial", type=_int_at_least(0), metavar="N", help="the trial (default: the best)")
    ex.add_argument("--out", required=True, metavar="FILE", help="where to write (config.json, or model.onnx)")
    ex.add_argument("--format", default="json", choices=["json", "onnx"],
                    help="json: the config (schema mpsearch.config/1); onnx: the model with QDQ nodes")

    rp = sub.add_parser("report", help="rebuild DIR/report.html (and PNG plots) from a search's result.json")
    rp.add_argument("dir", metavar="DIR", help="the output directory of a search or compare")
    rp.add_argument("--no-png", action="store_true", help="the HTML report only")

    w = sub.add_parser("worker", help="run trials of a study another search started (shared --storage)")
    w.add_argument("--storage", required=True, metavar="URL",
                   help="the search's Optuna storage: a database URL or journal:///file.log on a shared disk")
    w.add_argument("--study-name", metavar="NAME", help="the study (default: the only one in the storage)")
    w.add_argument("--trials", type=_positive_int, metavar="N",
                   help="at most N trials from this worker (default: until the study has the search's --trials)")
    w.add_argument("--retries", type=_natural_int, default=1, metavar="N",
                   help="runs of a trial whose process died (database storages) before it stays failed (default 1)")
    w.add_argument("--out", metavar="DIR", help="where to write result.json (default mpsearch-out/<task>-<target>-<time>)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _add_search_options(s: argparse.ArgumentParser, compare: bool = False) -> None:
    s.add_argument("--task", required=True, help="built-in name, package.module:function or file.py:function")
    if compare:
        s.add_argument("--targets", required=True, metavar="LIST",
                       help="targets (names or .toml profile files), comma-separated; the first one's space is searched")
    else:
        s.add_argument("--target", default="x86-vnni",
                       help="hardware target (see `mpsearch targets`) or a profile file (.toml)")
    s.add_argument("--trials", type=_positive_int, default=50,
                   help="number of trials (default 50; with --resume, in all)")
    s.add_argument("--strategy", default="hybrid",
                   help="hybrid (default: ILP over layer sensitivities first, then the sampler), optuna, ilp, "
                        "or exhaustive")
    s.add_argument("--sampler", default="tpe", help="tpe (default), nsga2, nsga3, random, qmc or gp")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    default_obj = "metric,bops" if compare else "metric,latency"
    s.add_argument("--objectives", default=default_obj, metavar="LIST",
                   help="metric and any of latency, weight_memory, activation_memory, bops, energy "
                        f"(default {default_obj})")
    if compare:
        s.add_argument("--latency-budget", type=_positive_float, action="append", default=[], metavar="MS",
                       help="a latency budget (ms) for every target's table (repeatable)")
    else:
        s.add_argument("--latency-budget", type=_positive_float, metavar="MS", help="latency budget in ms")
    s.add_argument("--size-budget", type=_positive_float, metavar="MB", help="weight memory budget in MB")
    s.add_argument("--memory-budget", type=_positive_float, metavar="MB",
                   help="weights plus peak activations budget in MB")
    s.add_argument("--weight-precisions", metavar="LIST", help="e.g. int4,int8,fp32 (default int2..int8,fp32)")
    s.add_argument("--activation-precisions", metavar="LIST", help="e.g. int8,fp32 (default)")
    s.add_argument("--tie", action="append", default=[], metavar="L1,L2,...",
                   help="layers that must share a precision (repeatable)")
    s.add_argument("--pin", action="append", default=[], metavar="LAYER=W/A",
                   help="fix a layer's precision, e.g. conv1=int8/int8 (repeatable)")
    s.add_argument("--pin-first-last", action="store_true", help="first and last layers at int8/int8")
    s.add_argument("--ilp-seeds", type=_positive_int, metavar="N",
                   help="ILP solutions a hybrid search starts from (default a tenth of the trials, at least 2)")
    s.add_argument("--exhaustive-limit", type=_positive_int, default=100_000, metavar="N",
                   help="largest space --strategy exhaustive enumerates (default 100000)")
    r = s.add_argument_group("study storage and resume")
    r.add_argument("--storage", metavar="URL",
                   help="Optuna storage: sqlite:///file.db, another database URL, or journal:///file.log "
                        "(default sqlite in the output directory)")
    r.add_argument("--study-name", metavar="NAME", help="study name (default <task>-<target>-<time>)")
    r.add_argument("--resume", action="store_true",
                   help="continue the study in --out / --storage up to --trials trials in all")
    d = s.add_argument_group("distributed search (see also: mpsearch worker)")
    d.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local (default): score in this process; ray: on Ray workers")
    d.add_argument("--ray-address", metavar="ADDR",
                   help="join the Ray cluster at HOST:PORT or auto (default: start a local Ray instance)")
    d.add_argument("--workers", type=_positive_int, metavar="N", help="Ray workers (default: one per CPU)")
    d.add_argument("--worker-threads", type=_positive_int, default=1, metavar="N",
                   help="torch threads (and Ray CPUs) per worker (default 1)")
    d.add_argument("--retries", type=_natural_int, default=1, metavar="N",
                   help="runs of a trial whose worker died before it is recorded as failed (default 1)")
    s.add_argument("--batch-size", type=_positive_int, default=1, help="batch size for pricing (default 1)")
    q = s.add_argument_group("quantizer (how candidates are scored)")
    q.add_argument("--weight-granularity", default="per_channel", choices=["per_channel", "per_tensor"])
    q.add_argument("--weight-clipping", default="auto", choices=["auto", "minmax", "mse"],
                   help="auto: MSE-optimal at 4 bits and below, min-max above")
    q.add_argument("--group-size", type=_positive_int, metavar="N", help="group-wise scales for Linear weights")
    q.add_argument("--act-range", default="minmax", choices=["minmax", "percentile", "mse"])
    q.add_argument("--act-percentile", type=float, default=99.99, metavar="P")
    q.add_argument("--bias-correction", default="auto", choices=["auto", "on", "off"],
                   help="auto: for integer weights of 6 bits and below")
    q.add_argument("--weight-rounding", default="nearest", choices=["nearest", "adaround"],
                   help="adaround: learned rounding for weights of 4 bits and fewer (computed once, cached)")
    q.add_argument("--early-stop", action="store_true",
                   help="multi-fidelity: stop scoring a candidate part-way once it clearly cannot matter")
    q.add_argument("--no-evaluator-cache", action="store_true", help="do not keep the evaluator cache on disk")
    s.add_argument("--out", metavar="DIR", help="output directory (default mpsearch-out/<task>-<target>-<time>)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (else MLFLOW_TRACKING_URI, else local)")
    g.add_argument("--no-mlflow", action="store_true", help="do not track in MLflow")
    s.add_argument("--experiment", default="mpsearch", help="MLflow experiment name (default mpsearch)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_tasks(args) -> int:
    from mpsearch.tasks import list_tasks

    for name, desc in list_tasks():
        print(f"{name:14s} {desc}")
    print("\nAny function returning a Task also works: --task package.module:function or path/file.py:function")
    return 0


def _cmd_targets(args) -> int:
    from hw_models import list_profiles

    for prof in list_profiles():
        w = ",".join(p.value for p in prof.weight_precisions)
        a = ",".join(p.value for p in prof.activation_precisions)
        native = sorted({f"{r.weight}/{r.activation}" for r in prof.rules if r.native})
        peaks = ", ".join(f"{k} {_rate(v)}" for k, v in sorted(prof.peak_macs_per_s.items(), key=lambda kv: -kv[1]))
        print(f"{prof.name:12s} {prof.kind:5s} {prof.description}")
        print(f"{'':12s} weights {w}; activations {a}")
        n_all = len(prof.weight_precisions) * len(prof.activation_precisions)
        shown = f"every listed weight x activation ({len(native)})" if len(native) == n_all else ", ".join(native)
        print(f"{'':12s} native pairs {shown}")
        print(f"{'':12s} peak MAC/s {peaks}")
        mem = [f"memory {prof.mem_bw_bytes_per_s / 1e9:.4g} GB/s", f"overhead {prof.layer_overhead_s * 1e6:.3g} us/layer"]
        if prof.weight_capacity_bytes:
            mem.append(f"weights must fit {prof.weight_capacity_bytes // 1024} KiB")
        if prof.act_capacity_bytes:
            mem.append(f"activations must fit {prof.act_capacity_bytes // 1024} KiB")
        if prof.energy_pj_per_mac:
            mem.append("energy figures")
        print(f"{'':12s} {'; '.join(mem)}\n")
    print("A profile file works wherever a target name does: --target my-cpu.toml (see mpsearch calibrate).")
    return 0


def _rate(v: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= scale:
            return f"{v / scale:.4g}{unit}"
    return f"{v:.4g}"


def _cmd_fetch_weights(args) -> int:
    from mpsearch.tasks.weights import fetch_all

    fetch_all()
    return 0


def _cmd_profile(args) -> int:
    from mpsearch.api import profile_config
    from mpsearch.report import cost_table

    model, candidate = profile_config(args.task, args.target, precision=args.precision, config=args.config,
                                      batch_size=args.batch_size)
    print(cost_table(model, candidate))
    return 0


def _cmd_calibrate(args) -> int:
    from mpsearch.calibrate import calibrate, write_profile

    if not args.out.endswith(".toml"):
        raise InvalidConfigError(f"--out must name a .toml file, got {args.out}")
    cal = calibrate(args.task, args.target, name=args.name, threads=args.threads, batch_size=args.batch_size,
                    n_mixed=max(0, args.mixed), seed=args.seed, progress=not args.no_progress)
    path = write_profile(cal, args.out)
    print(cal.summary())
    print(f"\nwrote {path}; use it with --target {path}")
    return 0


def _search_kwargs(args) -> dict:
    """The search options the search and compare commands share, as API keywords."""
    from mpsearch.evaluator import QuantSettings

    quant = QuantSettings(
        weight_granularity=args.weight_granularity,
        weight_clipping=args.weight_clipping,
        group_size=args.group_size,
        act_range=args.act_range,
        act_percentile=args.act_percentile,
        bias_correction=args.bias_correction,
        weight_rounding=args.weight_rounding,
    )
    pins = {}
    for item in args.pin:
        layer, eq, pair = item.partition("=")
        if not eq or not layer or not pair:
            raise InvalidConfigError(f"--pin expects LAYER=WEIGHT/ACTIVATION, got {item!r}")
        pins[layer] = pair
    return {
        "n_trials": args.trials,
        "sampler": args.sampler,
        "seed": args.seed,
        "weight_precisions": args.weight_precisions,
        "activation_precisions": args.activation_precisions,
        "out_dir": args.out,
        "mlflow_uri": args.mlflow_uri,
        "track": not args.no_mlflow,
        "experiment": args.experiment,
        "batch_size": args.batch_size,
        "progress": not args.no_progress,
        "quant": quant,
        "evaluator_cache": not args.no_evaluator_cache,
        "early_stop": args.early_stop,
        "strategy": args.strategy,
        "objectives": args.objectives,
        "size_budget_mb": args.size_budget,
        "memory_budget_mb": args.memory_budget,
        "ties": [[x.strip() for x in t.split(",") if x.strip()] for t in args.tie],
        "pins": pins,
        "pin_first_last": args.pin_first_last,
        "storage": args.storage,
        "study_name": args.study_name,
        "resume": args.resume,
        "n_seeds": args.ilp_seeds,
        "exhaustive_limit": args.exhaustive_limit,
        "backend": args.backend,
        "ray_address": args.ray_address,
        "workers": args.workers,
        "worker_threads": args.worker_threads,
        "retries": args.retries,
    }


def _cmd_search(args) -> int:
    from mpsearch.api import search

    result = search(args.task, args.target, latency_budget_ms=args.latency_budget, **_search_kwargs(args))
    _pngs(Path(result.settings["out_dir"]), result.tracking)
    _summary(result)
    return 0


def _cmd_compare(args) -> int:
    from mpsearch.api import compare
    from mpsearch.compare import compare_table

    kw = _search_kwargs(args)
    cmp = compare(args.task, args.targets, kw.pop("n_trials"), objectives=kw.pop("objectives"),
                  batch_size=kw.pop("batch_size"), latency_budget_ms=args.latency_budget, **kw)
    print(compare_table(cmp))
    out = Path(cmp.result.settings["out_dir"])
    _pngs(out, cmp.result.tracking)
    print(f"\nresults: {out / 'compare.json'} (the search: result.json beside it); report: {out / 'report.html'}")
    return 0


def _pngs(out: Path, tracking: dict) -> None:
    """The report's PNGs (matplotlib: the API writes report.html alone), also to MLflow."""
    from mpsearch.report_html import write_report
    from mpsearch.tracking import Tracker

    files = write_report(out, png=True)
    tracker = Tracker.resume(tracking)
    if tracker is not None:
        tracker.log_files(files)


def _cmd_export(args) -> int:
    from mpsearch.export import export_config, export_onnx, write_config

    config = export_config(args.dir, args.trial)
    if args.format == "onnx":
        proto = export_onnx(config["task"], config, args.out)
        dq = sum(n.op_type == "DequantizeLinear" for n in proto.graph.node)
        print(f"wrote {args.out}: trial {config['trial']} of {config['task']} as ONNX QDQ ({dq} DequantizeLinear)")
    else:
        write_config(config, args.out)
        print(f"wrote {args.out}: trial {config['trial']}, {config['metric_name']} {config['metric']:.4f}, "
              f"{len(config['layers'])} layers (schema {config['schema']})")
    return 0


def _cmd_report(args) -> int:
    from mpsearch.report_html import write_report

    for path in write_report(Path(args.dir), png=not args.no_png):
        print(path)
    return 0


def _cmd_worker(args) -> int:
    from mpsearch.api import join_study

    result = join_study(args.storage, args.study_name, out_dir=args.out, max_trials=args.trials,
                        progress=not args.no_progress, retries=args.retries)
    _summary(result)
    return 0


def _summary(result) -> None:
    from mpsearch.report import pareto_table

    print(pareto_table(result))
    out = Path(result.settings["out_dir"])
    hv, timing = result.hypervolume, result.timing
    if hv is not None:
        print(f"hypervolume {hv['value']:.6g} (reference point in result.json); time in sampler "
              f"{timing['sampler_s']:.1f} s, pricing {timing['pricing_s']:.2f} s, scoring {timing['scoring_s']:.1f} s"
              + "".join(f", {k.removesuffix('_s')} {v:.1f} s" for k, v in timing.items()
                        if k not in ("sampler_s", "pricing_s", "scoring_s")))
    ran, loop = result.settings.get("resumed_trials", 0), result.settings.get("search_s")
    if loop:
        n = len(result.trials) - ran
        print(f"{n} trial{'s' if n != 1 else ''} in {loop:.1f} s ({n / loop:.1f} a second"
              + (f", {result.settings['workers']} Ray workers" if result.settings.get("backend") == "ray" else "") + ")")
    print(f"\nresults: {out / 'result.json'} (Optuna study {result.settings['study_name']!r} in "
          f"{result.settings['storage']}); report: {out / 'report.html'}")
    if result.tracking.get("run_id"):
        print(f"MLflow: {result.tracking['mlflow_uri']} experiment {result.tracking['experiment']!r}, "
              f"run {result.tracking['run_id']}")


COMMANDS = {
    "tasks": _cmd_tasks,
    "targets": _cmd_targets,
    "fetch-weights": _cmd_fetch_weights,
    "search": _cmd_search,
    "compare": _cmd_compare,
    "report": _cmd_report,
    "export": _cmd_export,
    "worker": _cmd_worker,
    "profile": _cmd_profile,
    "calibrate": _cmd_calibrate,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MpsearchError as e:
        print(f"mpsearch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SearchInterrupted as e:
        print(f"mpsearch: interrupted; {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("mpsearch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
