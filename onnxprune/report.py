"""Tables for people, JSON for programs, and atomic text output."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import OutputError


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxprune-", dir=path.resolve().parent)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _count(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _change(before, after) -> str:
    if not before:
        return f"{_count(before)} → {_count(after)}"
    return f"{_count(before)} → {_count(after)} ({after / before:.0%})"


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" +{len(names) - limit}" if len(names) > limit else "")


def analysis_table(report: dict) -> Table:
    table = Table(title=f"Channel groups of {report['model']}", title_justify="left")
    for col, justify in (("group", "right"), ("channels", "right"), ("MACs", "right"),
                         ("producers", "left"), ("status", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for g in report["groups"]:
        status = "prunable" if g["prunable"] else ("frozen: " + "; ".join(g["frozen"])
                                                    if g["frozen"] else "single channel")
        table.add_row(str(g["id"]), str(g["channels"]), f"{g['macs_share']:.1%}",
                      _names(g["producers"]), status)
    return table


def print_analysis(console: Console, report: dict) -> None:
    console.print(analysis_table(report))
    n = sum(g["prunable"] for g in report["groups"])
    console.print(f"{len(report['groups'])} groups, {n} prunable, "
                  f"{report['prunable_macs_share']:.1%} of MACs in prunable groups")


def print_prune(console: Console, report: dict) -> None:
    table = Table(title=f"Pruned {report['model']} with {report['method']}",
                  title_justify="left")
    for col in ("group", "producers", "channels", "params", "MACs"):
        table.add_column(col, justify="left" if col == "producers" else "right",
                         overflow="fold")
    for g in report["groups"]:
        if g["kept"] == g["channels"]:
            continue
        table.add_row(str(g["id"]), _names(g["producers"], 2),
                      f"{g['channels']} → {g['kept']}",
                      _change(g["params_before"], g["params_after"]),
                      _change(g["macs_before"], g["macs_after"]))
    t = report["total"]
    table.add_section()
    table.add_row("total", f"{t['groups_pruned']} of {t['groups']} groups pruned",
                  f"{t['channels_before']} → {t['channels_after']}",
                  _change(t["params_before"], t["params_after"]),
                  _change(t["macs_before"], t["macs_after"]))
    console.print(table)
    if report.get("frozen_groups"):
        console.print(f"{report['frozen_groups']} groups frozen (see `onnxprune analyze`)")
    print_validation(console, report)
    if report.get("output"):
        console.print(f"wrote {report['output']}" +
                      (f" and plan {report['plan']}" if report.get("plan") else ""))


def agreement_line(agree: dict, samples: int, inputs: str) -> str:
    text = (f"output agreement on {samples} {inputs} inputs: max |Δ| "
            f"{agree['max_abs']:.4g}, mean |Δ| {agree['mean_abs']:.4g}")
    if agree.get("top1") is not None:
        text += f", top-1 match {agree['top1']:.1%}"
    return text


def print_validation(console: Console, report: dict) -> None:
    lat = report.get("latency")
    if lat:
        console.print(
            f"latency (onnxruntime CPU, {lat['threads']} thread(s), batch {lat['batch']}, median "
            f"of {lat['repeat']} alternating runs): {lat['before_ms']:.3f} ms → "
            f"{lat['after_ms']:.3f} ms ({lat['ratio']:.2f}×)")
    agree = report.get("agreement")
    if agree:
        console.print(agreement_line(agree, agree["samples"], agree["inputs"]))
    acc = report.get("accuracy")
    if acc:
        console.print(f"top-1 accuracy: {acc['before']:.2%} → {acc['after']:.2%}")
    if report.get("self_check_max_abs") is not None:
        console.print(f"self-check passed: the pruned model equals the original with the "
                      f"removed channels zeroed (max |Δ| {report['self_check_max_abs']:.2g})")


def dump_json(report: dict) -> str:
    return json.dumps(report, indent=1, default=float)
