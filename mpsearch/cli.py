"""Command-line interface. Parses arguments and calls the API; no logic of its own.

User errors print one line on stderr and exit with status 2, and so does every file that cannot
be written (a full disk, a read-only or missing directory): the line names the file and, where a
search was running, says that its finished trials are kept and how to continue it.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mpsearch import defaults as D
from mpsearch.errors import InvalidConfigError, MpsearchError, OutputDirError, SearchInterrupted

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line with the one prefix of every user error, not usage + message
        self.exit(EXIT_USAGE, f"mpsearch: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.HelpFormatter):
    """Help whose defaults come from the code: "%(default)s" is the flag's own default (a constant
    of mpsearch.defaults), and an action with a `code_default` (a function, called only when help
    is shown: it may import torch) has "{default}" and "{choices}" filled from where the API keeps
    them (QuantSettings, calibrate)."""

    def _get_help_string(self, action):
        text = action.help or ""
        lookup = getattr(action, "code_default", None)
        if lookup is not None and ("{default}" in text or "{choices}" in text):
            try:
                default, choices = lookup()
            except Exception:  # noqa: BLE001 - help must show even if the module cannot load
                default, choices = "see the Python API", ()
            text = text.replace("{default}", str(default)).replace("{choices}", ", ".join(choices))
        return text


def _quant_default(field: str, choices: str | None = None):
    """The default (and allowed values) of a QuantSettings field, for help."""

    def lookup():
        import dataclasses

        from mpsearch.scoring import evaluator
        default = {f.name: f.default for f in dataclasses.fields(evaluator.QuantSettings)}[field]
        return ("none" if default is None else default), (getattr(evaluator, choices) if choices else ())

    return lookup


def _calibrate_default(param: str):
    def lookup():
        import inspect

        from mpsearch.calibration.cpu import calibrate

        return inspect.signature(calibrate).parameters[param].default, ()

    return lookup


def _arg(group, *flags, code_default=None, **kw):
    action = group.add_argument(*flags, **kw)
    if code_default is not None:
        action.code_default = code_default
    return action


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
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number, got {s}")
    return v


def _budget(kind: str):
    def parse(s: str) -> str:
        from mpsearch.engine.budgets import parse_budget

        try:
            parse_budget(s, kind)
        except InvalidConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return s

    return parse


def _max_drop(s: str) -> str:
    from mpsearch.errors import InvalidConfigError
    from mpsearch.results.selection import parse_max_drop

    try:
        parse_max_drop(s)
    except InvalidConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("max drop: ")) from None
    return s.strip()


EXPORT_FORMATS = {".json": "json", ".onnx": "onnx"}  # output file extension -> export format
TASK_HELP = "built-in name (see mpsearch tasks), package.module:function or path/file.py:function"
DEFAULT_OUT = f"{D.OUT_ROOT}/<task>-<target>-<time>"


def build_parser() -> argparse.ArgumentParser:
    from mpsearch import __version__

    p = _Parser(prog="mpsearch", description="Mixed-precision quantization search.", formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"mpsearch {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                           help="one of these (mpsearch COMMAND --help: its options)")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                              formatter_class=_Formatter)

    command("tasks", "list built-in tasks")
    command("targets", "list hardware targets")
    command("fetch-weights", "fetch the pretrained weights built-in tasks need")

    pr = command("profile", "per-layer cost table of a configuration on a target")
    pr.add_argument("--task", required=True, help=TASK_HELP)
    pr.add_argument("--target", default=D.DEFAULT_TARGET,
                    help="hardware target (see mpsearch targets) or profile file (.toml); default %(default)s")
    how = pr.add_mutually_exclusive_group()
    how.add_argument("--precision", default="fp32", metavar="P",
                     help="every layer at P (int8, fp32, ...) or WEIGHT/ACT (int4/int8); default %(default)s")
    how.add_argument("--config", metavar="FILE",
                     help="per-layer precisions: a config file of mpsearch export, a result.json trial or JSON "
                          "{layer: {weight, activation}}")
    pr.add_argument("--batch-size", type=_positive_int, default=D.DEFAULT_BATCH_SIZE,
                    help="batch size priced (default %(default)s)")

    c = command("calibrate", "measure this machine and write a fitted profile (.toml)")
    c.add_argument("--task", required=True, help=TASK_HELP)
    _arg(c, "--target", help="the profile to fit: a CPU profile (ONNX Runtime) or a GPU one such as h100 (needs "
                             "CUDA); default {default}", code_default=_calibrate_default("target"))
    c.add_argument("--out", required=True, metavar="FILE.toml", help="where to write the profile")
    c.add_argument("--name", help="the new profile's name (default <target>-calibrated)")
    c.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU: intra-op threads (default: the profile's)")
    _arg(c, "--batch-size", type=_positive_int, metavar="B", help="batch size measured (default {default})",
         code_default=_calibrate_default("batch_size"))
    _arg(c, "--mixed", type=_natural_int, metavar="N",
         help="CPU: random mixed configurations timed end to end, for the in-context layer table "
              "(default {default})", code_default=_calibrate_default("n_mixed"))
    _arg(c, "--seed", type=int, help="random seed of the mixed configurations (default {default})",
         code_default=_calibrate_default("seed"))
    c.add_argument("--no-progress", action="store_true", help="no progress bars")

    _add_search_options(command("search", "search per-layer precisions for a task on a target"))
    _add_search_options(command("compare", "one search, priced and compared on several targets"), compare=True)

    ex = command("export", "a trial's per-layer precisions as a config file, or its deployed ONNX QDQ graph")
    ex.add_argument("dir", metavar="DIR", help="the output directory of a search (its result.json)")
    ex.add_argument("--trial", type=_int_at_least(0), metavar="N",
                    help="the trial (default: the search's best, as its summary printed)")
    ex.add_argument("--out", required=True, metavar="FILE",
                    help="where to write: FILE.json (the config) or FILE.onnx (the model)")
    ex.add_argument("--task", metavar="REF", help="the task, when result.json names a task file or module: mpsearch runs code only from a task you name (built-in tasks need no --task)")
    ex.add_argument("--format", choices=sorted(set(EXPORT_FORMATS.values())),
                    help="json: the config (schema mpsearch.config/1); onnx: the deployed graph with QDQ nodes; "
                         "default: from the extension of --out")

    v = command("verify", "measure a search's best and front configurations as deployed graphs on real hardware")
    v.add_argument("dir", metavar="DIR", help="the output directory of a search (its result.json)")
    v.add_argument("--task", metavar="REF", help="the task, when result.json names a task file or module: mpsearch runs code only from a task you name (built-in tasks need no --task)")
    _add_verify_options(v)
    v.add_argument("--backend", default=D.DEFAULT_BACKEND, choices=D.BACKENDS,
                   help="local: measure on this machine; ray: on a node of the Ray cluster carrying a resource "
                        "named after the target (default %(default)s)")
    v.add_argument("--ray-address", metavar="ADDR", help="the Ray cluster, HOST:PORT or auto (with --backend ray)")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")

    rp = command("report", "rebuild DIR/report.html (and PNG plots) from a search's result.json")
    rp.add_argument("dir", metavar="DIR", help="the output directory of a search or compare")
    rp.add_argument("--no-png", action="store_true", help="the HTML report only (the PNGs need Chrome or Chromium, for kaleido)")

    w = command("worker", "run trials of a study another search started (shared --storage)")
    w.add_argument("--storage", required=True, metavar="URL",
                   help="the search's Optuna storage: a database URL or journal:///file.log on a shared disk")
    w.add_argument("--study-name", metavar="NAME", help="the study (default: the only one in the storage)")
    w.add_argument("--task", metavar="REF",
                   help="the study's task, when it is a task file or module: a worker runs code only from a task you "
                        "name, not one read from the storage (built-in tasks need no --task)")
    w.add_argument("--trials", type=_positive_int, metavar="N",
                   help="at most N trials from this worker (default: until the study has the search's --trials)")
    w.add_argument("--retries", type=_natural_int, default=D.DEFAULT_RETRIES, metavar="N",
                   help="runs of a trial whose process died (database storages) before it stays failed "
                        "(default %(default)s)")
    w.add_argument("--out", metavar="DIR", help=f"where to write result.json (default {DEFAULT_OUT})")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _add_verify_options(v) -> None:
    """verify's measurement options."""
    from mpsearch.deploy.verify import DEFAULT_ROUNDS, DEFAULT_TOP

    v.add_argument("--top", type=_natural_int, default=DEFAULT_TOP, metavar="N",
                   help="front configurations to measure, those with the highest metric, besides the best "
                        "(default %(default)s)")
    v.add_argument("--threads", type=_positive_int, metavar="N",
                   help="ONNX Runtime intra-op threads (default: the target profile's)")
    v.add_argument("--batch-size", type=_positive_int, metavar="B", help="batch size timed (default: the search's)")
    v.add_argument("--rounds", type=_positive_int, default=DEFAULT_ROUNDS, metavar="N",
                   help="interleaved timing rounds (default %(default)s)")


def _add_search_options(s: argparse.ArgumentParser, compare: bool = False) -> None:
    from hw_models.cost import WEIGHT_BYTES
    from mpsearch.results.objectives import DEFAULT_OBJECTIVES, OBJECTIVES

    s.add_argument("--task", required=True, help=TASK_HELP)
    if compare:
        s.add_argument("--targets", required=True, metavar="LIST",
                       help="targets (names or .toml profile files), comma-separated; the first one's space is searched")
    else:
        s.add_argument("--target", default=D.DEFAULT_TARGET,
                       help="hardware target (see mpsearch targets) or a profile file (.toml); default %(default)s")
    s.add_argument("--trials", type=_positive_int, default=D.DEFAULT_TRIALS, metavar="N",
                   help="number of trials (default %(default)s; with --resume, in all)")
    s.add_argument("--strategy", default=D.DEFAULT_STRATEGY, metavar="NAME",
                   help=f"{', '.join(D.STRATEGIES)} (default %(default)s; hybrid: ILP solutions over layer "
                        "sensitivities first, then the sampler)")
    s.add_argument("--sampler", default=D.DEFAULT_SAMPLER, metavar="NAME",
                   help=f"Optuna sampler: {', '.join(D.SAMPLERS)} (default %(default)s)")
    s.add_argument("--seed", type=int, default=D.DEFAULT_SEED, help="random seed (default %(default)s)")
    default_obj = D.COMPARE_OBJECTIVES if compare else ",".join(DEFAULT_OBJECTIVES)
    s.add_argument("--objectives", default=default_obj, metavar="LIST",
                   help=f"metric and any of {', '.join(o for o in OBJECTIVES if o != 'metric')}, comma-separated "
                        "(default %(default)s)")
    b = s.add_argument_group("budgets")
    if compare:
        b.add_argument("--latency-budget", type=_positive_float, action="append", default=[], metavar="MS",
                       help="a latency budget (ms) for every target's table (repeatable)")
    else:
        b.add_argument("--latency-budget", type=_budget("latency"), metavar="MS",
                       help="latency budget in ms, or relative to the target's uniform FP32 or int8 (0.5xfp32, "
                            "75%%int8): a constraint, configurations over it are priced, not scored")
    b.add_argument("--size-budget", type=_budget("size"), metavar="MB",
                   help="weight memory budget in MB, or relative (75%%int8, 0.25xfp32)")
    b.add_argument("--memory-budget", type=_budget("memory"), metavar="MB",
                   help="weights plus peak activations budget in MB, or relative (0.5xfp32)")
    b.add_argument("--weight-bytes", choices=WEIGHT_BYTES, default=WEIGHT_BYTES[0],
                   help="how weight bytes are counted for size, memory and weight_memory: with the integer "
                        "weights' per-channel fp32 scales (as the exported graph stores them) or the packed "
                        "values alone (default %(default)s)")
    b.add_argument("--max-drop", type=_max_drop, metavar="D",
                   help="how far below FP32 the best configuration's metric may be: metric points (0.01) or "
                        "percent of the FP32 metric (1%%); best is the fastest within it (the cheapest in the first "
                        "cost objective without latency). Default: one standard error of an accuracy-like FP32 "
                        "metric on the evaluation set (at least one sample), else 1%% of it")
    sp = s.add_argument_group("search space")
    sp.add_argument("--weight-precisions", metavar="LIST",
                    help="weight precisions to search, e.g. int4,int8,fp32 (default: every one the target runs)")
    sp.add_argument("--activation-precisions", metavar="LIST",
                    help="activation precisions to search, e.g. int8,fp32 (default: every one the target runs)")
    sp.add_argument("--tie", action="append", default=[], metavar="L1,L2,...",
                    help="layers that must share a precision (repeatable)")
    sp.add_argument("--pin", action="append", default=[], metavar="LAYER=W/A",
                    help="fix a layer's precision, e.g. conv1=int8/int8 (repeatable)")
    sp.add_argument("--pin-first-last", action="store_true", help="first and last layers at int8/int8")
    sp.add_argument("--ilp-seeds", type=_positive_int, metavar="N",
                    help="ILP solutions a hybrid search starts from (default a tenth of the trials, at least 2)")
    sp.add_argument("--patience", type=_natural_int, metavar="N",
                    help="a budgeted hybrid search (a budget, no --max-drop) stops after N trials without a better "
                         "configuration within the budgets (default a fifth of the trials, at least 10; 0: never)")
    sp.add_argument("--sensitivity", choices=D.SENSITIVITY_METHODS, default=D.DEFAULT_SENSITIVITY,
                    help="how the ilp and hybrid strategies measure each layer's sensitivity: fisher (a "
                         "second-order estimate, ~4x faster on mobilenet_v2) or exact (the KL itself); "
                         "default %(default)s")
    sp.add_argument("--exhaustive-limit", type=_positive_int, default=D.EXHAUSTIVE_LIMIT, metavar="N",
                    help="largest space --strategy exhaustive enumerates (default %(default)s)")
    sp.add_argument("--batch-size", type=_positive_int, default=D.DEFAULT_BATCH_SIZE, metavar="B",
                    help="batch size for pricing (default %(default)s)")
    r = s.add_argument_group("study storage and resume")
    r.add_argument("--storage", metavar="URL",
                   help="Optuna storage: sqlite:///file.db, another database URL, or journal:///file.log "
                        f"(default: the journal file {D.STUDY_FILE} in the output directory)")
    r.add_argument("--study-name", metavar="NAME", help="study name (default <task>-<target>-<time>)")
    r.add_argument("--resume", action="store_true",
                   help="continue the study in --out / --storage up to --trials trials in all")
    d = s.add_argument_group("distributed search (see also: mpsearch worker)")
    d.add_argument("--backend", default=D.DEFAULT_BACKEND, choices=D.BACKENDS,
                   help="local: score in this process; ray: on Ray workers (default %(default)s)")
    d.add_argument("--ray-address", metavar="ADDR",
                   help="join the Ray cluster at HOST:PORT or auto (default: start a local Ray instance)")
    d.add_argument("--workers", type=_positive_int, metavar="N", help="Ray workers (default: one per CPU)")
    d.add_argument("--worker-threads", type=_positive_int, default=D.DEFAULT_WORKER_THREADS, metavar="N",
                   help="torch threads (and Ray CPUs) per worker (default %(default)s)")
    d.add_argument("--retries", type=_natural_int, default=D.DEFAULT_RETRIES, metavar="N",
                   help="runs of a trial whose worker died before it is recorded as failed (default %(default)s)")
    q = s.add_argument_group("quantizer (how candidates are scored; defaults of mpsearch.scoring.evaluator.QuantSettings)")
    _arg(q, "--weight-granularity", metavar="G", code_default=_quant_default("weight_granularity", "WEIGHT_GRANULARITIES"),
         help="symmetric integer weights with one scale per output channel or per tensor: {choices} "
              "(default {default})")
    _arg(q, "--weight-clipping", metavar="C", code_default=_quant_default("weight_clipping", "WEIGHT_CLIPPINGS"),
         help="weight range: {choices}; auto: MSE-optimal at 4 bits and below, min-max above (default {default})")
    _arg(q, "--group-size", type=_positive_int, metavar="N", code_default=_quant_default("group_size"),
         help="Linear weights get one scale per group of N input columns (default {default}: per channel)")
    _arg(q, "--act-range", metavar="R", code_default=_quant_default("act_range", "ACT_RANGES"),
         help="activation ranges from the calibration batches: {choices} (default {default})")
    _arg(q, "--act-percentile", type=float, metavar="P", code_default=_quant_default("act_percentile"),
         help="the percentile of --act-range percentile, in (50, 100] (default {default})")
    _arg(q, "--bias-correction", metavar="B", code_default=_quant_default("bias_correction", "BIAS_CORRECTIONS"),
         help="subtract the output shift weight quantization causes: {choices}; auto: integer weights of 6 bits "
              "and below (default {default})")
    _arg(q, "--weight-rounding", metavar="R", code_default=_quant_default("weight_rounding", "WEIGHT_ROUNDINGS"),
         help="{choices}; adaround: learned rounding for weights of 4 bits and fewer, computed once and cached "
              "(default {default})")
    q.add_argument("--early-stop", action="store_true",
                   help="multi-fidelity: stop scoring a candidate part-way once it clearly cannot matter")
    q.add_argument("--no-evaluator-cache", action="store_true",
                   help="do not keep the evaluator's calibration and quantized weights on disk")
    o = s.add_argument_group("output and tracking")
    o.add_argument("--out", metavar="DIR", help=f"output directory (default {DEFAULT_OUT})")
    g = o.add_mutually_exclusive_group()
    g.add_argument("--mlflow-uri", metavar="URI",
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's local store)")
    g.add_argument("--no-mlflow", action="store_true", help="do not track in MLflow")
    o.add_argument("--experiment", default=D.DEFAULT_EXPERIMENT, metavar="NAME",
                   help="MLflow experiment name (default %(default)s)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines on stderr")
    if not compare:
        o.add_argument("--verify", type=_natural_int, default=0, metavar="N",
                       help="after the search, measure its best and the N front configurations with the highest "
                            "metric as deployed graphs on this machine, beside FP32 and all-int8 (mpsearch verify; "
                            "default %(default)s: not at all)")


QUANT_FLAGS = ("weight_granularity", "weight_clipping", "group_size", "act_range", "act_percentile",
               "bias_correction", "weight_rounding")


def _cmd_tasks(args) -> int:
    from mpsearch.tasks import list_tasks

    for name, desc in list_tasks():
        print(f"{name:14s} {desc}")
    print("\nAny function returning a Task also works: --task package.module:function or path/file.py:function")
    return 0


def _cmd_targets(args) -> int:
    from mpsearch.report.text import targets_text

    print(targets_text())
    return 0


def _cmd_fetch_weights(args) -> int:
    from mpsearch.tasks.weights import fetch_all

    fetch_all()
    return 0


def _cmd_profile(args) -> int:
    from mpsearch.api import profile_config
    from mpsearch.report.text import layer_cost_text

    model, candidate = profile_config(args.task, args.target, precision=args.precision, config=args.config,
                                      batch_size=args.batch_size)
    print(layer_cost_text(model, candidate))
    return 0


def _given(args, names: dict[str, str]) -> dict:
    """API keyword -> value for the flags the user gave (None: not given, the API's default)."""
    return {kw: getattr(args, dest) for dest, kw in names.items() if getattr(args, dest) is not None}


def _cmd_calibrate(args) -> int:
    from mpsearch.calibration.cpu import calibrate, write_profile

    if not args.out.endswith(".toml"):
        raise InvalidConfigError(f"--out must name a .toml file, got {args.out}")
    given = _given(args, {"target": "target", "batch_size": "batch_size", "mixed": "n_mixed", "seed": "seed"})
    cal = calibrate(args.task, name=args.name, threads=args.threads, progress=not args.no_progress, **given)
    path = write_profile(cal, args.out)
    print(cal.summary())
    print(f"\nwrote {path}; use it with --target {path}")
    return 0


def _quant(args):
    """QuantSettings from the quantizer flags given (the others keep QuantSettings' defaults)."""
    from mpsearch.scoring.evaluator import QuantSettings

    try:
        return QuantSettings(**_given(args, {f: f for f in QUANT_FLAGS}))
    except InvalidConfigError as e:  # name the flag, not the field
        field, _, rest = str(e).partition(" ")
        raise InvalidConfigError(f"--{field.replace('_', '-')} {rest}") from None


def _search_kwargs(args) -> dict:
    """The search options the search and compare commands share, as API keywords."""
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
        "quant": _quant(args),
        "evaluator_cache": not args.no_evaluator_cache,
        "early_stop": args.early_stop,
        "strategy": args.strategy,
        "objectives": args.objectives,
        "size_budget_mb": args.size_budget,
        "memory_budget_mb": args.memory_budget,
        "weight_bytes": args.weight_bytes,
        "max_drop": args.max_drop,
        "ties": [[x.strip() for x in t.split(",") if x.strip()] for t in args.tie],
        "pins": pins,
        "pin_first_last": args.pin_first_last,
        "storage": args.storage,
        "study_name": args.study_name,
        "resume": args.resume,
        "n_seeds": args.ilp_seeds,
        "patience": args.patience,
        "sensitivity": args.sensitivity,
        "exhaustive_limit": args.exhaustive_limit,
        "backend": args.backend,
        "ray_address": args.ray_address,
        "workers": args.workers,
        "worker_threads": args.worker_threads,
        "retries": args.retries,
    }


def _cmd_search(args) -> int:
    from mpsearch.api import search
    from mpsearch.report.text import summary_text

    with _on_write_error(_trials_kept(args)):
        result = search(args.task, args.target, latency_budget_ms=args.latency_budget, **_search_kwargs(args))
    print(summary_text(result))
    out = Path(result.settings["out_dir"])
    if args.verify:
        from mpsearch.deploy.verify import summary, verify

        print(f"\nverifying the best and {args.verify} front configuration(s) as deployed graphs:")
        redo = _command("verify", str(out), *(["--task", args.task] if ":" in args.task else []),
                        "--top", str(args.verify))
        with _on_write_error(lambda e: f"the search is complete in {out}: {_remedy(e)}, then `{redo}` measures it"):
            print(summary(verify(out, top=args.verify, task=args.task, backend=args.backend,
                                 ray_address=args.ray_address, progress=not args.no_progress)))
    _pngs(out, result.tracking)
    return 0


def _cmd_verify(args) -> int:
    from mpsearch.deploy.verify import summary, verify

    if args.ray_address and args.backend != "ray":
        raise InvalidConfigError("--ray-address needs --backend ray")
    v = verify(args.dir, top=args.top, task=args.task, threads=args.threads, batch_size=args.batch_size,
               rounds=args.rounds, backend=args.backend, ray_address=args.ray_address, progress=not args.no_progress)
    print(summary(v))
    print(f"\nwritten to {Path(args.dir) / 'result.json'} (\"verification\") and {Path(args.dir) / 'report.html'}")
    return 0


def _cmd_compare(args) -> int:
    from mpsearch.api import compare
    from mpsearch.report.text import compare_table, next_steps, tracking_line

    kw = _search_kwargs(args)
    with _on_write_error(_trials_kept(args)):
        cmp = compare(args.task, args.targets, kw.pop("n_trials"), objectives=kw.pop("objectives"),
                      batch_size=kw.pop("batch_size"), latency_budget_ms=args.latency_budget, **kw)
    print(compare_table(cmp))
    out = Path(cmp.result.settings["out_dir"])
    print(f"\nresults: {out / 'compare.json'} (the search: result.json beside it); report: {out / 'report.html'}")
    if cmp.result.tracking.get("off"):
        print(tracking_line(cmp.result.tracking))
    first = cmp.targets[0]
    print(next_steps(cmp.result, cmp.view(first).best, f"{first}'s best configuration"))
    _pngs(out, cmp.result.tracking)
    return 0


def _pngs(out: Path, tracking: dict) -> None:
    """The report's figures as PNGs, also to MLflow (mpsearch.report.html.draw_pngs, which the API
    offers too); a failed write says how to draw them again."""
    from mpsearch.report.html import draw_pngs

    redo = _command("report", str(out))
    with _on_write_error(lambda e: f"the search is complete in {out}: {_remedy(e)}, then `{redo}` draws the "
                                   "report and its plots"):
        draw_pngs(out, tracking)


def _export_format(args) -> str:
    """--format, else the one --out's extension names; refuses a --format the extension contradicts."""
    suffix = Path(args.out).suffix.lower()
    implied = EXPORT_FORMATS.get(suffix)
    if args.format is None:
        if implied is None:
            known = " or ".join(f"FILE{ext}" for ext in EXPORT_FORMATS)
            raise InvalidConfigError(f"cannot tell the format of --out {args.out} from its extension: name {known}, "
                                     "or give --format")
        return implied
    if implied is not None and implied != args.format:
        raise InvalidConfigError(f"--format {args.format} contradicts --out {args.out} (a {suffix} file is "
                                 f"{implied}): drop --format or name a .{args.format} file")
    return args.format


def _cmd_export(args) -> int:
    from mpsearch.deploy.export import export_config, export_onnx, write_config

    fmt = _export_format(args)
    config = export_config(args.dir, args.trial)
    if fmt == "onnx":
        import json

        from mpsearch.cache import atomic_write_bytes
        from mpsearch.tasks import trusted_task

        task = trusted_task(config["task"], args.task, str(Path(args.dir) / "result.json"))
        proto = export_onnx(task, config)
        atomic_write_bytes(args.out, proto.SerializeToString())  # whole or not at all, as onnx.save writes it
        runtime = json.loads({p.key: p.value for p in proto.metadata_props}["mpsearch.runtime"])
        storage = {}
        for fqn, how in runtime["storage"].items():
            storage.setdefault(how, []).append(fqn)
        stored = "; ".join(f"{len(v)} weight(s) stored as {k}" for k, v in sorted(storage.items())) or "fp32 weights"
        print(f"wrote {args.out}: trial {config['trial']} of {config['task']} as its deployed ONNX QDQ graph "
              f"({stored})")
        for fqn, note in runtime["notes"].items():
            print(f"  {fqn}: {note}")
    else:
        write_config(config, args.out)
        print(f"wrote {args.out}: trial {config['trial']}, {config['metric_name']} {config['metric']:.4f}, "
              f"{len(config['layers'])} layers (schema {config['schema']})")
    return 0


def _cmd_report(args) -> int:
    from mpsearch.errors import MissingDependencyError
    from mpsearch.report.html import write_report

    try:
        files = write_report(Path(args.dir), png=not args.no_png)
    except MissingDependencyError as e:
        files = write_report(Path(args.dir))
        print(f"mpsearch: PNG plots skipped: {e}", file=sys.stderr)
    for path in files:
        print(path)
    return 0


def _cmd_worker(args) -> int:
    from mpsearch.api import join_study
    from mpsearch.report.text import summary_text

    with _on_write_error(lambda e: f"the finished trials are kept in the study: {_remedy(e)}, then "
                                   f"`{_command(*args.argv)}` runs the worker again"):
        result = join_study(args.storage, args.study_name, out_dir=args.out, max_trials=args.trials,
                            progress=not args.no_progress, retries=args.retries, task=args.task)
    print(summary_text(result, with_next_steps=False))
    return 0


# errors of a file that cannot be written: the disk (or quota) is full, the file too large for
# the process's limit, the directory read-only or not ours, the device failing
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})
# the files a search writes in its output directory (an error naming one names the directory)
OUT_FILES = frozenset({"result.json", "report.html", "best_config.json", "compare.json", D.STUDY_FILE, "study.db"})


def _os_error(e: OSError) -> str:
    """An OSError in words, naming its file: "No space left on device: OUT/result.json"."""
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


def _remedy(e: OSError) -> str:
    """What lets the write succeed next time."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space"
    if e.errno == errno.EFBIG:
        return "raise the file size limit (ulimit -f)"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "make it writable"
    return "fix the disk"


def _command(*argv: str) -> str:
    return shlex.join(["mpsearch", *argv])


@contextmanager
def _on_write_error(then: Callable[[OSError], str]) -> Iterator[None]:
    """A file that cannot be written (WRITE_ERRNOS) is one line (OutputDirError): the OSError
    naming its file, then `then(error)`: what was kept and the command that goes on from there."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise OutputDirError(f"{_os_error(e)}; {then(e)}") from None


def _trials_kept(args) -> Callable[[OSError], str]:
    """The hint of a search (or compare) a write stopped: its finished trials are in the study
    (each is stored when told, and result.json is rebuilt from it), and the same command with
    --resume (and the output directory) continues it and writes the rest; a search stopped before
    its study held anything (its new study file is removed then) is simply run again."""

    def then(e: OSError) -> str:
        out = args.out
        if out is None and e.filename and (Path(e.filename).name in OUT_FILES or str(e.filename).endswith(".png")):
            out = str(Path(e.filename).parent)  # the default output directory, named by its file
        study = _study_file(args.storage, out)
        if study is not None and not study.exists():
            return f"nothing was kept: {_remedy(e)}, then run it again"
        argv = list(args.argv)
        if "--resume" not in argv:
            argv.append("--resume")
        if args.out is None and (out or not args.storage):  # --storage alone finds the study, not the outputs
            argv += ["--out", out or "DIR"]
        where = f" ({study})" if study is not None else ""
        return (f"the finished trials are kept in the study{where}: {_remedy(e)}, then `{_command(*argv)}` "
                "continues the search and writes the rest")

    return then


def _study_file(storage: str | None, out: str | None) -> Path | None:
    """The file of a search's study: --storage's journal or SQLite file, else the one in its output
    directory (as mpsearch.engine.storage.default_storage picks it); None for a database server, or when the
    output directory is not known."""
    if storage:
        for prefix in ("journal:///", "sqlite:///"):
            if storage.startswith(prefix):
                return Path(storage.removeprefix(prefix).split("?", 1)[0])
        return None
    if out is None:
        return None
    old = Path(out) / "study.db"
    return old if old.exists() else Path(out) / D.STUDY_FILE


def _flush_stdout() -> None:
    """Flush stdout; if that fails (a full disk, a closed pipe), an OSError naming it, and stdout
    goes to /dev/null so that Python's own flush at exit says nothing more."""
    try:
        sys.stdout.flush()
    except OSError as e:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        except (OSError, ValueError):  # pragma: no cover - a stdout without a file descriptor
            pass
        raise OSError(e.errno, e.strerror, "<stdout>") from None


COMMANDS = {
    "tasks": _cmd_tasks,
    "targets": _cmd_targets,
    "fetch-weights": _cmd_fetch_weights,
    "search": _cmd_search,
    "compare": _cmd_compare,
    "report": _cmd_report,
    "verify": _cmd_verify,
    "export": _cmd_export,
    "worker": _cmd_worker,
    "profile": _cmd_profile,
    "calibrate": _cmd_calibrate,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line, for the one that continues a search a full disk stopped
    try:
        rc = COMMANDS[args.command](args)
        _flush_stdout()  # a full disk behind stdout is one line too, not Python's words at exit
        return rc
    except MpsearchError as e:
        print(f"mpsearch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a file the user named cannot be read or written
        print(f"mpsearch: error: {_os_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    except SearchInterrupted as e:
        print(f"mpsearch: interrupted; {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("mpsearch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
