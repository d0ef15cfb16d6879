"""Time each pipeline stage in-process (load → analyze → score → plan → apply → save).

    python benchmarks/stages.py MODEL [--method fpgm] [--ratio 0.4] [-n 5]

Prints the median of n runs per stage, and the pipeline total without Python's
import time (which the end-to-end CLI numbers in run_e2e.py include).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from onnxprune import analyze, apply, load_normalized, save_model, score, select


def run_once(model: str, method: str, ratio: float, out: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        now = time.perf_counter()
        times[name] = now - start
        start = now

    m = load_normalized(model)
    lap("load+normalize")
    a = analyze(m)
    lap("analyze")
    s = score(a, method)
    lap("score")
    selection = select(a, s, ratio, 8)
    lap("plan")
    surgery = apply(a, selection)
    lap("apply")
    save_model(surgery.model, out)
    lap("save")
    times["total"] = sum(times.values())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--method", default="fpgm")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_once(args.model, args.method, args.ratio, Path(tmp) / "out.onnx")
                for _ in range(args.n)]
    print(f"{args.model}: method {args.method}, ratio {args.ratio}, median of {args.n} runs")
    for stage in runs[0]:
        print(f"  {stage:15s} {statistics.median(r[stage] for r in runs):8.3f} s")


if __name__ == "__main__":
    main()
