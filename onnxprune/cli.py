"""The `onnxprune` command: a thin layer over the pipeline.

    onnxprune MODEL [options]              prune (the default command)
    onnxprune analyze MODEL                list channel groups
    onnxprune apply MODEL PLAN -o OUT      re-apply a plan file

Exit codes: 0 ok, 1 internal error, 2 bad arguments, 3 bad input file,
4 output not writable, 5 model or plan not supported, 6 self-check failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__, report
from .errors import OnnxPruneError, UsageError
from .pipeline import Options, analysis_report, default_output, prune, sensitivity_report
from .score import METHODS, NORMALIZERS, REDUCTIONS
from .sensitivity import DEFAULT_RATIOS

COMMANDS = ("prune", "analyze", "apply", "eval", "sensitivity", "finetune")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str):
        raise UsageError(message)


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number, got '{text}'") from None


def _add_validation(p: argparse.ArgumentParser) -> None:
    v = p.add_argument_group("validation (onnxruntime)")
    v.add_argument("--data", metavar="NPZ",
                   help="held-out data: .npz with array x and optional labels y")
    v.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip every onnxruntime step: checker self-check, agreement, latency")
    v.add_argument("--threads", type=int, default=1,
                   help="onnxruntime intra-op threads for all measurements (default 1)")
    v.add_argument("--batch", type=int, default=1, help="batch size of the latency runs")
    v.add_argument("--repeat", type=int, default=30, help="timed runs per model (default 30)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")


def build_parser() -> dict[str, argparse.ArgumentParser]:
    prune_p = _Parser(prog="onnxprune", description="Structured channel pruning of an ONNX "
                      "model: prune MODEL (default), or 'onnxprune analyze|apply ...'.")
    prune_p.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    prune_p.add_argument("model", help="input .onnx file (never modified)")
    prune_p.add_argument("-o", "--output", help="output .onnx (default: MODEL.pruned.onnx)")
    prune_p.add_argument("--method", default="fpgm", choices=METHODS,
                         help="channel criterion (default fpgm)")
    prune_p.add_argument("--ratio", type=_ratio, default=0.4,
                         help="fraction of each group's channels to remove, in [0, 1)")
    prune_p.add_argument("--round-to", type=int, default=Options.round_to,
                         help=f"keep channel counts multiples of N (default {Options.round_to})")
    prune_p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                         help="leave nodes or tensors matching this glob alone (repeatable)")
    prune_p.add_argument("--plan", metavar="JSON", help="write the applied plan to this file")
    prune_p.add_argument("--normalizer", default="mean", choices=list(NORMALIZERS),
                         help="per-layer score normalization in multi-layer groups")
    prune_p.add_argument("--reduction", default="mean", choices=list(REDUCTIONS),
                         help="how scores of coupled layers are combined")
    prune_p.add_argument("--fpgm-norm-fraction", type=float, default=0.0, metavar="F",
                         help="FPGM official-code variant: prune the int(F*C) smallest-norm "
                              "filters first (default 0: the paper's form)")
    prune_p.add_argument("--seed", type=int, default=0, help="seed for random and inputs")
    budget = prune_p.add_argument_group("criteria that need data, and budgets")
    budget.add_argument("--grads", metavar="NPZ",
                        help="stored gradients for taylor, taylor-sq, taylor-bn (see README)")
    budget.add_argument("--scope", choices=["local", "global"], default="local",
                        help="rank channels per group (local) or across all groups (global)")
    budget.add_argument("--max-layer-ratio", type=float, default=1.0, metavar="R",
                        help="no group loses more than this fraction (never all channels)")
    budget.add_argument("--target-macs", type=float, metavar="F",
                        help="prune until MACs are at most F of the original (e.g. 0.5)")
    budget.add_argument("--ratio-for", action="append", default=[], metavar="PATTERN=R",
                        help="ratio for the groups whose layers match PATTERN (repeatable)")
    budget.add_argument("--ratios-from", metavar="JSON",
                        help="per-group ratios from `onnxprune sensitivity` (with --target-macs)")
    budget.add_argument("--hgsr-form", choices=["l1/2", "l2"], default="l1/2",
                        help="HGSR feature-wise score: squared group L1/2 (default) or L2")
    budget.add_argument("--samples", type=int, default=128,
                        help="training samples for HGSR's greedy selection (default 128)")
    budget.add_argument("--candidates", type=int, default=1,
                        help="HGSR greedy: lowest-scored candidates per group and step")
    _add_validation(prune_p)

    analyze_p = _Parser(prog="onnxprune analyze",
                        description="List the channel groups of a model and why any is frozen.")
    analyze_p.add_argument("model")
    analyze_p.add_argument("--exclude", action="append", default=[], metavar="PATTERN")
    analyze_p.add_argument("--json", action="store_true")
    analyze_p.add_argument("--debug", action="store_true")

    apply_p = _Parser(prog="onnxprune apply",
                      description="Re-apply a plan file to a model (e.g. after more training).")
    apply_p.add_argument("model")
    apply_p.add_argument("plan_file", metavar="PLAN")
    apply_p.add_argument("-o", "--output", required=True)
    apply_p.add_argument("--plan", metavar="JSON", help="write the applied plan again")
    _add_validation(apply_p)
    eval_p = _Parser(prog="onnxprune eval",
                     description="Accuracy, agreement, latency, params and MACs of one model, "
                                 "or of two side by side.")
    eval_p.add_argument("model")
    eval_p.add_argument("other", nargs="?", help="a second model to compare with")
    eval_p.add_argument("--data", metavar="NPZ", help=".npz with x and optional labels y")
    eval_p.add_argument("--threads", type=int, default=1)
    eval_p.add_argument("--batch", type=int, default=1, help="latency batch size")
    eval_p.add_argument("--repeat", type=int, default=30)
    eval_p.add_argument("--warmup", type=int, default=5)
    eval_p.add_argument("--seed", type=int, default=0)
    eval_p.add_argument("--eval-batch", type=int, default=64)
    eval_p.add_argument("--json", action="store_true")
    eval_p.add_argument("--debug", action="store_true")

    sens_p = _Parser(prog="onnxprune sensitivity",
                     description="Prune each group alone at ratios 0.1…0.9 and measure.")
    sens_p.add_argument("model")
    sens_p.add_argument("--data", metavar="NPZ", required=True)
    sens_p.add_argument("--method", default="fpgm", choices=METHODS)
    sens_p.add_argument("--grads", metavar="NPZ")
    sens_p.add_argument("--ratios", default=",".join(map(str, DEFAULT_RATIOS)))
    sens_p.add_argument("--samples", type=int, default=512, help="data rows used (default 512)")
    sens_p.add_argument("--exclude", action="append", default=[], metavar="PATTERN")
    sens_p.add_argument("-o", "--output", help="JSON (default MODEL.sensitivity.json)")
    sens_p.add_argument("--plot", help="PNG (default: the JSON path with .png)")
    sens_p.add_argument("--threads", type=int, default=1)
    sens_p.add_argument("--seed", type=int, default=0)
    sens_p.add_argument("--json", action="store_true")
    sens_p.add_argument("--debug", action="store_true")
    tune_p = _Parser(prog="onnxprune finetune",
                     description="Train an ONNX model with cross-entropy in PyTorch and write the "
                                 "weights back into the same graph (needs onnxprune[torch]).")
    tune_p.add_argument("model")
    tune_p.add_argument("--data", metavar="NPZ", required=True, help=".npz with x and labels y")
    tune_p.add_argument("-o", "--output", required=True)
    tune_p.add_argument("--epochs", type=int, default=1)
    tune_p.add_argument("--lr", type=float, default=1e-3)
    tune_p.add_argument("--batch-size", type=int, default=64)
    tune_p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    tune_p.add_argument("--momentum", type=float, default=0.9)
    tune_p.add_argument("--weight-decay", type=float, default=0.0)
    tune_p.add_argument("--seed", type=int, default=0)
    tune_p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    tune_p.add_argument("--json", action="store_true")
    tune_p.add_argument("--debug", action="store_true")
    return {"prune": prune_p, "analyze": analyze_p, "apply": apply_p, "eval": eval_p,
            "sensitivity": sens_p, "finetune": tune_p}


@contextmanager
def _progress(console: Console, enabled: bool):
    """Progress bars on stderr for the steps that take more than a moment."""
    if not enabled:
        yield lambda _label, _total: (lambda: None)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=console, transient=True) as bar:
        def start(label: str, total: int) -> Callable[[], None]:
            task = bar.add_task(label, total=total)
            return lambda: bar.advance(task)
        yield start


def _options(args: argparse.Namespace) -> Options:
    return Options(
        method=getattr(args, "method", "fpgm"), ratio=getattr(args, "ratio", 0.0),
        round_to=getattr(args, "round_to", 1), exclude=getattr(args, "exclude", []),
        normalizer=getattr(args, "normalizer", "mean"),
        reduction=getattr(args, "reduction", "mean"),
        fpgm_norm_fraction=getattr(args, "fpgm_norm_fraction", 0.0),
        seed=getattr(args, "seed", 0), validate=args.validate, data=args.data,
        threads=args.threads, batch=args.batch, repeat=args.repeat,
        grads=getattr(args, "grads", None), scope=getattr(args, "scope", "local"),
        max_layer_ratio=getattr(args, "max_layer_ratio", 1.0),
        target_macs=getattr(args, "target_macs", None),
        ratio_for=getattr(args, "ratio_for", []), hgsr_form=getattr(args, "hgsr_form", "l1/2"),
        samples=getattr(args, "samples", 128), candidates=getattr(args, "candidates", 1),
        ratios_from=getattr(args, "ratios_from", None))


def _emit(args: argparse.Namespace, out: Console, result: dict,
          summary: Callable[[dict], str]) -> int:
    """The report as JSON with --json, else a one-line summary."""
    if args.json:
        print(report.dump_json(result))
    else:
        out.print(summary(result))
    return 0


def run(argv: Sequence[str]) -> int:
    argv = list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "prune"
    if argv and argv[0] in COMMANDS:
        argv = argv[1:]
    args = build_parser()[command].parse_args(argv)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    if command == "analyze":
        result = analysis_report(args.model, args.exclude)
        if args.json:
            print(report.dump_json(result))
        else:
            report.print_analysis(out, result)
        return 0
    if command == "eval":
        from .evaluate import EvalOptions, evaluate, print_eval

        opts = EvalOptions(data=args.data, threads=args.threads, batch=args.batch,
                           repeat=args.repeat, warmup=args.warmup, seed=args.seed,
                           eval_batch=args.eval_batch)
        with _progress(err, not args.json and err.is_terminal) as progress:
            result = evaluate(args.model, args.other, opts, progress=progress)
        print(report.dump_json(result)) if args.json else print_eval(out, result)
        return 0
    if command == "sensitivity":
        with _progress(err, not args.json and err.is_terminal) as progress:
            result = sensitivity_report(args, progress)
        return _emit(args, out, result, lambda r: (
            f"wrote {r['output']} and {r['plot']} ({len(r['groups'])} groups, metric: "
            f"{r['metric']}, baseline {r['baseline']:.4f})"))
    if command == "finetune":
        result = finetune_command(args, err)
        return _emit(args, out, result, lambda r: (
            f"trained {args.epochs} epoch(s): loss {r['losses'][0]:.4f} → "
            f"{r['losses'][-1]:.4f}; top-1 {r['accuracy_before']:.2%} → "
            f"{r['accuracy_after']:.2%}; wrote {r['output']}"))
    options = _options(args)
    output = args.output or default_output(args.model)
    with _progress(err, not args.json and err.is_terminal) as progress:
        result = prune(args.model, output, options, args.plan,
                       from_plan=args.plan_file if command == "apply" else None,
                       progress=progress)
    if args.json:
        print(report.dump_json(result))
    else:
        if result["total"]["groups_pruned"] == 0:
            out.print("nothing to prune: no group is prunable at this ratio "
                      "(see `onnxprune analyze`); the output is the normalized model")
        report.print_prune(out, result)
    return 0


def finetune_command(args: argparse.Namespace, err: Console) -> dict:
    from .load import check_output_path

    check_output_path(args.output, [args.model, args.data])
    try:
        from onnxprune.adapters.torch.finetune import finetune
    except ImportError as exc:
        raise UsageError(f"finetune needs PyTorch: pip install 'onnxprune[torch]' ({exc})") \
            from None
    with _progress(err, not args.json and err.is_terminal) as start:
        bars: dict[int, Callable[[], None]] = {}

        def on_step(epoch: int, _step: int, steps: int, _loss: float) -> None:
            if epoch not in bars:
                bars[epoch] = start(f"epoch {epoch}/{args.epochs}", steps)
            bars[epoch]()
        return finetune(args.model, args.data, args.output, epochs=args.epochs, lr=args.lr,
                        batch_size=args.batch_size, optimizer=args.optimizer,
                        momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed,
                        device=args.device, progress=on_step)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        return run(argv)
    except OnnxPruneError as exc:
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback, unless asked
        if debug:
            raise
        print(f"onnxprune: internal error: {exc.__class__.__name__}: {exc} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
