"""The whole pipeline, stage by stage, as the CLI runs it.

load → analyze → score → plan → apply → validate → report. Each function returns
a plain dict (the report), so the CLI only parses arguments and prints.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import criteria, validate
from .analyze import Analysis, analyze
from .apply import Surgery, apply
from .errors import UsageError
from .load import check_output_path, load_normalized, save_model
from .metrics import node_costs, total_macs, total_params
from .plan import (Selection, channels_to_remove, check_ratio, check_target_macs,
                   parse_ratio_for, plan_document, read_plan, select, selection_from_plan,
                   write_plan)
from .score import METHODS, score


@dataclass
class Options:
    """How to prune and how to check; the CLI flags, one for one."""

    method: str = "fpgm"
    ratio: float = 0.4
    round_to: int = 8
    exclude: list[str] = field(default_factory=list)
    normalizer: str = "mean"
    reduction: str = "mean"
    fpgm_norm_fraction: float = 0.0
    seed: int = 0
    grads: str | None = None
    scope: str = "local"
    max_layer_ratio: float = 1.0
    target_macs: float | None = None
    ratio_for: list[str] = field(default_factory=list)
    hgsr_form: str = "l1/2"
    samples: int = 128
    candidates: int = 1
    ratios_from: str | None = None
    validate: bool = True
    data: str | None = None
    threads: int = 1
    batch: int = 1
    repeat: int = 30
    warmup: int = 5

    def check(self) -> None:
        check_ratio(self.ratio)
        if self.method not in METHODS:
            raise UsageError(f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        if not 0 <= self.fpgm_norm_fraction < 1:
            raise UsageError("--fpgm-norm-fraction must be in [0, 1)")
        if self.target_macs is not None:
            check_target_macs(self.target_macs)
        if self.ratios_from and self.target_macs is None:
            raise UsageError("--ratios-from needs --target-macs")
        if self.hgsr_form not in criteria.HGSR_FORMS:
            raise UsageError(f"--hgsr-form must be one of {', '.join(criteria.HGSR_FORMS)}")
        for name in ("threads", "batch", "repeat", "round_to", "samples", "candidates"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")


Progress = Callable[[str, int], Callable[[], None]]


def _no_progress(_label: str, _total: int) -> Callable[[], None]:
    return lambda: None


def analysis_report(path: str | os.PathLike, exclude: list[str] = ()) -> dict:
    model = load_normalized(path)
    a = analyze(model, exclude)
    return _analysis_dict(str(path), a)


def _analysis_dict(path: str, a: Analysis) -> dict:
    total = a.total_macs or 1
    groups = [{
        "id": g.index, "channels": g.channels, "prunable": g.prunable, "frozen": g.frozen,
        "producers": [p.node.name for p in g.producers], "members": g.nodes,
        "macs": g.macs, "macs_share": g.macs / total,
    } for g in a.groups]
    prunable_nodes = {n for g in a.groups if g.prunable for n in g.nodes}
    costs = node_costs(a.model)
    share = sum(costs[n].macs for n in prunable_nodes if n in costs) / total
    return {"model": path, "groups": groups, "total_macs": a.total_macs,
            "prunable_macs_share": share}


def prune(path: str | os.PathLike, output: str | os.PathLike, options: Options,
          plan_path: str | os.PathLike | None = None, *, from_plan: str | os.PathLike | None = None,
          progress: Progress = _no_progress) -> dict:
    """Prune `path` into `output` (or re-apply the plan file `from_plan`); return the report."""
    options.check()
    output = check_output_path(output, [path, from_plan])
    if plan_path is not None:
        plan_path = check_output_path(plan_path, [path, output, from_plan])
    x = y = None
    if options.validate and options.data:
        x, y = validate.load_data(options.data)

    notes: list[str] = []
    if x is None and options.method == "hgsr" and options.data:
        x, y = validate.load_data(options.data)
    model = load_normalized(path)
    if x is not None:
        validate.check_feed(model, x)
    a = analyze(model, options.exclude)
    params_before, macs_before = total_params(model), total_macs(model)
    costs_before = node_costs(model)
    if from_plan is not None:
        document_in = read_plan(from_plan)
        selection = selection_from_plan(a, document_in)
        method, ratio = document_in.get("method", "plan"), document_in.get("ratio")
    else:
        selection, method, ratio = _choose(path, a, options, x, y, progress, notes)
    surgery = apply(a, selection)
    document = plan_document(
        a, selection, model=str(path), method=method, ratio=ratio,
        options={"round_to": options.round_to, "exclude": options.exclude,
                 "scope": options.scope, "target_macs": options.target_macs,
                 "ratio_for": options.ratio_for, "max_layer_ratio": options.max_layer_ratio,
                 "normalizer": options.normalizer, "reduction": options.reduction,
                 "fpgm_norm_fraction": options.fpgm_norm_fraction, "seed": options.seed},
        slices=surgery.slices, updates=surgery.updates)
    if from_plan is not None:
        _check_same_slices(document_in, document)

    report = _prune_dict(str(path), a, selection, surgery, method, options, costs_before,
                         params_before, macs_before)
    report["notes"] = notes
    check = None
    if options.validate:
        def check(tmp_path: Path) -> None:
            validate.check_graph(tmp_path, path)
            report["self_check_max_abs"] = validate.verify(path, tmp_path, surgery.slices,
                                                           threads=options.threads)
    save_model(surgery.model, output, check=check)
    report["output"] = str(output)
    if plan_path is not None:
        write_plan(document, plan_path)
        report["plan"] = str(plan_path)
    if options.validate:
        report.update(measure(path, output, options, x, y, progress))
    return report


def _choose(path, a: Analysis, options: Options, x, y, progress: Progress,
            notes: list[str]) -> tuple[Selection, str, float]:
    """Score and select, by the options: a ratio, a MACs target, sensitivity ratios, or
    HGSR's loss-based greedy selection."""
    prunable = [g for g in a.groups if g.prunable]
    grads = criteria.Gradients(options.grads) if options.grads else None
    step = progress(f"scoring {len(prunable)} groups ({options.method})", len(prunable))
    scores = score(a, options.method, seed=options.seed, groups=prunable,
                   progress=lambda _g: step(), normalizer=options.normalizer,
                   reduction=options.reduction, grads=grads, hgsr_form=options.hgsr_form,
                   **({"norm_fraction": options.fpgm_norm_fraction}
                      if options.method == "fpgm" else {}))
    ratio_for = parse_ratio_for(options.ratio_for)
    if options.method == "hgsr" and x is not None:
        from .greedy import greedy_select, sample, targets_for
        from .masks import MaskedModel

        masked = MaskedModel(path, options.exclude, options.threads)
        xs, ys = sample(x, y, options.samples, options.seed)
        targets, source = targets_for(masked, xs, ys)
        # one step per channel, or per aligned block with --round-to (count not known ahead)
        total = (None if options.target_macs is not None or options.round_to > 1 else
                 sum(channels_to_remove(g.channels, options.ratio, 1) for g in prunable))
        start = time.perf_counter()
        step = progress("HGSR greedy selection", total)
        selection, trace = greedy_select(masked, scores, xs, targets, options.ratio,
                                         candidates=options.candidates, ratio_for=ratio_for,
                                         max_layer_ratio=options.max_layer_ratio,
                                         target_macs=options.target_macs,
                                         round_to=options.round_to, on_step=step)
        channels = sum(len(t["channels"]) for t in trace)
        notes.append(f"HGSR greedy selection on {len(xs)} samples against {source}: "
                     f"{channels} channels in {len(trace)} steps in "
                     f"{time.perf_counter() - start:.1f} s")
        return selection, options.method, options.ratio
    if options.method == "hgsr":
        notes.append("HGSR without --data: channels ranked by the feature-wise score only")
    if options.ratios_from:
        from .sensitivity import allocate, read_sensitivity

        selection = allocate(a, scores, read_sensitivity(options.ratios_from),
                             options.target_macs, options.round_to)
        return selection, options.method, options.ratio
    selection = select(a, scores, options.ratio, options.round_to, scope=options.scope,
                       ratio_for=ratio_for, max_layer_ratio=options.max_layer_ratio,
                       target_macs=options.target_macs)
    return selection, options.method, options.ratio


def _check_same_slices(expected: dict, got: dict) -> None:
    from .errors import UnsupportedModelError

    def key(entry: dict):
        return (entry["tensor"], entry.get("consumer"), entry["axis"], tuple(entry["removed"]))
    want = sorted(map(key, expected.get("slices", [])))
    have = sorted(map(key, got["slices"]))
    if want != have:
        missing = sorted(set(want) ^ set(have))[0]
        raise UnsupportedModelError(f"plan does not fit this model: slices of tensor "
                                    f"'{missing[0]}' differ")


def _prune_dict(path: str, a: Analysis, selection: Selection, surgery: Surgery, method: str,
                options: Options, costs_before, params_before, macs_before) -> dict:
    costs_after = node_costs(surgery.model)
    groups = []
    for g in a.groups:
        removed = len(selection.get(g.index, ()))
        groups.append({
            "id": g.index, "producers": [p.node.name for p in g.producers],
            "channels": g.channels, "kept": g.channels - removed,
            "params_before": sum(costs_before[n].params for n in g.nodes if n in costs_before),
            "params_after": sum(costs_after[n].params for n in g.nodes if n in costs_after),
            "macs_before": sum(costs_before[n].macs for n in g.nodes if n in costs_before),
            "macs_after": sum(costs_after[n].macs for n in g.nodes if n in costs_after),
            "frozen": g.frozen or None,
        })
    pruned = [g for g in groups if g["kept"] < g["channels"]]
    return {
        "model": path, "method": method, "ratio": options.ratio, "round_to": options.round_to,
        "scope": options.scope, "target_macs": options.target_macs,
        "groups": groups,
        "frozen_groups": sum(1 for g in a.groups if g.frozen),
        "total": {
            "groups": len(groups), "groups_pruned": len(pruned),
            "channels_before": sum(g["channels"] for g in groups),
            "channels_after": sum(g["kept"] for g in groups),
            "params_before": params_before, "params_after": total_params(surgery.model),
            "macs_before": macs_before, "macs_after": total_macs(surgery.model),
        },
        "slices": len(surgery.slices), "updates": len(surgery.updates),
    }


def measure(before: str | os.PathLike, after: str | os.PathLike, options: Options,
            x: np.ndarray | None = None, y: np.ndarray | None = None,
            progress: Progress = _no_progress) -> dict:
    """Agreement, accuracy and latency of `after` against `before`, in one process."""
    ref = validate.session(before, options.threads)
    new = validate.session(after, options.threads)
    out: dict = {}
    if x is not None:
        ref_out = validate.run_batches(ref, x)
        new_out = validate.run_batches(new, x)
        inputs, samples = "data", len(x)
        feeds = {ref.get_inputs()[0].name: x[:options.batch].astype(np.float32)
                 if np.issubdtype(x.dtype, np.floating) else x[:options.batch]}
        if y is not None and ref_out[0].ndim == 2:
            out["accuracy"] = {"before": validate.topk_accuracy(ref_out[0], y),
                               "after": validate.topk_accuracy(new_out[0], y)}
    else:
        feeds_eval = validate.random_inputs(ref, batch=8, seed=options.seed + 1)
        ref_out, new_out = ref.run(None, feeds_eval), new.run(None, feeds_eval)
        inputs, samples = "random", 8
        feeds = validate.random_inputs(ref, batch=options.batch, seed=options.seed)
    agree = validate.agreement(ref_out, new_out)
    out["agreement"] = {"inputs": inputs, "samples": samples, "max_abs": agree.max_abs,
                        "mean_abs": agree.mean_abs, "top1": agree.top1}
    step = progress("measuring latency", options.repeat)
    times = validate.latency([ref, new], feeds, options.repeat, options.warmup, on_step=step)
    b, c = validate.median(times[0]), validate.median(times[1])
    out["latency"] = {"threads": options.threads, "batch": options.batch,
                      "repeat": options.repeat, "before_ms": b * 1e3, "after_ms": c * 1e3,
                      "ratio": c / b if b else float("nan")}
    return out


def sensitivity_report(args, progress: Progress = _no_progress) -> dict:
    """`onnxprune sensitivity`: the sweep, its JSON and its plot."""
    from .masks import MaskedModel
    from .report import write_text_atomic
    from .sensitivity import plot, sweep

    try:
        ratios = [check_ratio(float(r)) for r in str(args.ratios).split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--ratios takes numbers like 0.1,0.5, got '{args.ratios}'") from None
    if args.samples < 1:
        raise UsageError("--samples must be at least 1")
    output = Path(args.output) if args.output else \
        Path(args.model).with_name(Path(args.model).stem + ".sensitivity.json")
    picture = Path(args.plot) if args.plot else output.with_suffix(".png")
    for p in (output, picture):
        check_output_path(p, [args.model, args.data])
    x, y = validate.load_data(args.data)
    masked = MaskedModel(args.model, args.exclude, args.threads)
    validate.check_feed(masked.analysis.model, x)
    if len(x) > args.samples:
        from .greedy import sample
        x, y = sample(x, y, args.samples, args.seed)
    grads = criteria.Gradients(args.grads) if args.grads else None
    prunable = [g for g in masked.analysis.groups if g.prunable]
    scores = score(masked.analysis, args.method, seed=args.seed, groups=prunable, grads=grads)
    step = progress(f"sensitivity of {len(prunable)} groups", len(prunable) * len(ratios))
    document = sweep(masked, scores, x, y, ratios, model=str(args.model), method=args.method,
                     on_step=step)
    write_text_atomic(output, json.dumps(document, indent=1) + "\n")
    plot(document, picture)
    return {**document, "output": str(output), "plot": str(picture)}


def default_output(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".pruned.onnx")


__all__ = ["Options", "analysis_report", "prune", "measure", "default_output"]
