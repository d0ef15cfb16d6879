"""End-to-end wall time / peak memory harness for the onnxprune CLI.

For each model path, runs a command line N times as a child process and
reports the median wall time and the child's peak RSS, plus the model's size
on disk (ONNX file + every external data file it references) and the size of
what the command wrote.

    python benchmarks/run_e2e.py --prepare                 # build benchmarks/_work/{resnet50,big_vgg}.onnx, run on both
    python benchmarks/run_e2e.py m1.onnx m2.onnx -n 5
    python benchmarks/run_e2e.py --cmd '{python} -c "import numpy"' benchmarks/_work/resnet50.onnx

--cmd is a template (default below). Placeholders, all shell-quoted on
substitution: {model} (absolute model path), {out} (output path, in a fresh
per-model directory under --out-dir), {out_dir}, {stem} (model file stem),
{python} (this interpreter). The command is split with shlex and run without
a shell. If the first word is not on PATH but exists next to this
interpreter (e.g. .venv/bin/onnxprune), that one is used.

Peak RSS method (--rss-method, default auto = first available of):
  time    /usr/bin/time -v  (GNU time forks the command itself, so the number
          is the command's own high-water mark)
  psutil  poll the child's memory_info().rss (sampled; can miss short spikes)
  procfs  poll /proc/PID/status VmHWM (kernel high-water mark of the exec'd
          image; only growth in the last poll interval can be missed)
  wait4   os.wait4 ru_maxrss. CAVEAT: on Linux a child's ru_maxrss starts at
          the RSS its parent had when it forked, so this is a floor of
          ~(harness RSS); the harness keeps itself small (stdlib only) to
          limit that, and flags suspicious values.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "_work")
DEFAULT_CMD = "onnxprune {model} --method fpgm --ratio 0.4 -o {out} --no-validate"
PREPARED = {
    "resnet50": os.path.join(WORK, "resnet50.onnx"),
    "big_vgg": os.path.join(WORK, "big_vgg.onnx"),
}
GNU_TIME = "/usr/bin/time"


# --------------------------------------------------------------------------
# measuring one child
# --------------------------------------------------------------------------
@dataclass
class RunResult:
    rc: int
    wall_s: float
    peak_rss_mb: float | None
    method: str
    stdout_tail: str = ""
    stderr_tail: str = ""
    note: str = ""


def _self_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _gnu_time_ok() -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        return False
    try:
        r = subprocess.run([GNU_TIME, "-v", "-o", os.devnull, "true"], capture_output=True, timeout=10)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def pick_method(method: str = "auto") -> str:
    if method != "auto":
        return method
    if _gnu_time_ok():
        return "time"
    try:
        import psutil  # noqa: F401

        return "psutil"
    except ImportError:
        pass
    if os.path.exists("/proc/self/status"):
        return "procfs"
    return "wait4"


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def measure(cmd: list[str], method: str = "auto", timeout: float | None = None, cwd: str | None = None,
            poll_s: float = 0.01, stdout_path: str | None = None) -> RunResult:
    """Run ``cmd`` once; return exit code, wall time and the child's peak RSS.
    stdout/stderr go to temp files (or ``stdout_path``); their tails are kept."""
    method = pick_method(method)
    tmp = tempfile.mkdtemp(prefix="e2e_")
    out_p = stdout_path or os.path.join(tmp, "stdout")
    err_p = os.path.join(tmp, "stderr")
    time_p = os.path.join(tmp, "time")
    argv = [GNU_TIME, "-v", "-o", time_p, "--", *cmd] if method == "time" else list(cmd)
    note = ""
    peak_kb: float | None = None
    try:
        with open(out_p, "wb") as fo, open(err_p, "wb") as fe:
            t0 = time.perf_counter()
            # own process group, so a timeout also kills the grandchild under /usr/bin/time
            proc = subprocess.Popen(argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, cwd=cwd,
                                    start_new_session=True)
            deadline = None if timeout is None else t0 + timeout
            status = ru = None
            ps = None
            if method == "psutil":
                import psutil

                try:
                    ps = psutil.Process(proc.pid)
                except psutil.Error:
                    ps = None
            peak_kb = 0.0 if method in ("psutil", "procfs") else None
            while True:
                pid, st, r = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    status, ru = st, r
                    break
                if method == "psutil" and ps is not None:
                    try:
                        peak_kb = max(peak_kb, ps.memory_info().rss / 1024.0)
                    except Exception:
                        pass
                elif method == "procfs":
                    try:
                        with open(f"/proc/{proc.pid}/status") as f:
                            for line in f:
                                if line.startswith("VmHWM:"):
                                    # high-water mark of the current image; take the latest
                                    # (a pre-exec value of the forked interpreter is replaced)
                                    peak_kb = float(line.split()[1])
                                    break
                    except (OSError, ValueError):
                        pass
                if deadline is not None and time.perf_counter() > deadline:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    deadline = None
                    note = f"killed after {timeout}s timeout; "
                time.sleep(poll_s)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        rc = proc.returncode
        if method == "time":
            txt = open(time_p).read() if os.path.exists(time_p) else ""
            m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", txt)
            peak_kb = float(m.group(1)) if m else None
            m = re.search(r"Exit status:\s*(-?\d+)", txt)
            if m:
                rc = int(m.group(1))
            if "terminated by signal" in txt:
                note += re.search(r"Command terminated by signal \d+", txt).group(0) + "; "
        elif method == "wait4":
            peak_kb = float(ru.ru_maxrss)
            floor = _self_rss_mb()
            if peak_kb / 1024.0 < 1.1 * floor:
                note += f"wait4 value may be just the harness's own RSS (~{floor:.0f} MB); "
        return RunResult(rc=rc, wall_s=wall, peak_rss_mb=None if peak_kb is None else peak_kb / 1024.0,
                         method=method, stdout_tail=_tail(out_p), stderr_tail=_tail(err_p), note=note)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# model sizes (in a child process: keeps onnx/protobuf out of the harness)
# --------------------------------------------------------------------------
_SIZE_SNIPPET = r"""
import json, os, sys
path = sys.argv[1]
res = {"onnx_bytes": os.path.getsize(path), "external": {}, "error": None}
try:
    import onnx
    m = onnx.load(path, load_external_data=False)
    base = os.path.dirname(os.path.abspath(path))
    locs = set()
    n_ext = 0
    tensors = list(m.graph.initializer)
    for n in m.graph.node:  # Constant nodes can hold external tensors too
        for a in n.attribute:
            if a.HasField("t"):
                tensors.append(a.t)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            n_ext += 1
            for e in t.external_data:
                if e.key == "location":
                    locs.add(e.value)
    for loc in sorted(locs):
        p = os.path.join(base, loc)
        res["external"][loc] = os.path.getsize(p) if os.path.exists(p) else None
    res.update(nodes=len(m.graph.node), initializers=len(m.graph.initializer), external_tensors=n_ext,
               opset=[(o.domain or "ai.onnx", o.version) for o in m.opset_import])
except Exception as e:  # noqa: BLE001
    res["error"] = repr(e)
print(json.dumps(res))
"""


def model_disk_info(path: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _SIZE_SNIPPET, path], capture_output=True, text=True)
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = {"onnx_bytes": os.path.getsize(path), "external": {}, "error": r.stderr[-500:]}
    if info.get("error"):
        # fallback: ONNX file + "<stem>.data" / "<file>.data" siblings if present
        stem = os.path.splitext(path)[0]
        for cand in (stem + ".data", path + ".data"):
            if os.path.exists(cand):
                info["external"][os.path.basename(cand)] = os.path.getsize(cand)
    info["total_bytes"] = info["onnx_bytes"] + sum(v or 0 for v in info["external"].values())
    return info


def dir_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------
def prepare(force: bool = False) -> list[str]:
    os.makedirs(WORK, exist_ok=True)
    py = sys.executable
    steps = [
        (PREPARED["resnet50"], [py, os.path.join(HERE, "models.py"), "--export-resnet50", PREPARED["resnet50"]]),
        (PREPARED["big_vgg"], [py, os.path.join(HERE, "make_big_model.py"), "-o", PREPARED["big_vgg"]]),
    ]
    for target, cmd in steps:
        if os.path.exists(target) and not force:
            print(f"[prepare] exists: {target}")
            continue
        print(f"[prepare] {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"[prepare] done in {time.perf_counter() - t:.1f} s", flush=True)
    return [PREPARED["resnet50"], PREPARED["big_vgg"]]


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------
@dataclass
class ModelReport:
    model: str
    disk: dict
    runs: list[RunResult] = field(default_factory=list)
    out_bytes: int | None = None
    cmd: str = ""

    def summary(self) -> dict:
        walls = [r.wall_s for r in self.runs]
        rss = [r.peak_rss_mb for r in self.runs if r.peak_rss_mb is not None]
        return {
            "model": self.model,
            "disk_mib": self.disk["total_bytes"] / 2**20,
            "runs": len(self.runs),
            "failed": sum(r.rc != 0 for r in self.runs),
            "wall_median_s": statistics.median(walls) if walls else None,
            "wall_min_s": min(walls) if walls else None,
            "wall_max_s": max(walls) if walls else None,
            "rss_median_mib": statistics.median(rss) if rss else None,
            "rss_max_mib": max(rss) if rss else None,
            "rss_over_disk": (max(rss) / (self.disk["total_bytes"] / 2**20)) if rss else None,
            "out_mib": None if self.out_bytes is None else self.out_bytes / 2**20,
            "method": self.runs[0].method if self.runs else None,
        }


def resolve_cmd(template: str, model: str, out: str, out_dir: str) -> list[str]:
    q = shlex.quote
    stem = os.path.splitext(os.path.basename(model))[0]
    s = template.format(model=q(model), out=q(out), out_dir=q(out_dir), stem=q(stem), python=q(sys.executable))
    argv = shlex.split(s)
    if argv and shutil.which(argv[0]) is None:
        cand = os.path.join(os.path.dirname(sys.executable), argv[0])
        if os.access(cand, os.X_OK):
            argv[0] = cand
    return argv


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(reports: list[ModelReport], meta: dict):
    rows = [r.summary() for r in reports]
    headers = ["model", "disk MiB", "runs", "fail", "wall med s", "wall min-max s", "peak RSS med MiB",
               "peak RSS max MiB", "RSS/disk", "out MiB"]
    body = [[os.path.basename(s["model"]), _fmt(s["disk_mib"], ".1f"), str(s["runs"]), str(s["failed"]),
             _fmt(s["wall_median_s"], ".2f"), f"{_fmt(s['wall_min_s'], '.2f')}-{_fmt(s['wall_max_s'], '.2f')}",
             _fmt(s["rss_median_mib"], ".0f"), _fmt(s["rss_max_mib"], ".0f"), _fmt(s["rss_over_disk"], ".2f"),
             _fmt(s["out_mib"], ".1f")] for s in rows]
    title = f"e2e: {meta['cmd']}  (n={meta['n']}, rss via {meta['method']})"
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for i, h in enumerate(headers):
            t.add_column(h, justify="left" if i == 0 else "right")
        for row in body:
            t.add_row(*row)
        Console(width=None if sys.stdout.isatty() else 200).print(t)
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
        for r in body:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    # markdown, for pasting into RESULTS.md
    print("\n| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for r in body:
        print("| " + " | ".join(r) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="ONNX model paths (default with --prepare: the prepared ones)")
    ap.add_argument("--cmd", default=DEFAULT_CMD, help=f"command template (default: {DEFAULT_CMD!r})")
    ap.add_argument("-n", "--repeat", type=int, default=3, help="runs per model (default 3)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed runs per model first (e.g. to warm the page cache)")
    ap.add_argument("--out-dir", default=os.path.join(WORK, "e2e_out"))
    ap.add_argument("--keep-output", action="store_true", help="keep the last run's output files")
    ap.add_argument("--rss-method", default="auto", choices=["auto", "time", "psutil", "procfs", "wait4"])
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run before the child is killed")
    ap.add_argument("--prepare", action="store_true", help="export resnet50 + build big_vgg into benchmarks/_work/")
    ap.add_argument("--force-prepare", action="store_true", help="rebuild prepared models even if present")
    ap.add_argument("--json", metavar="PATH", help="write raw results as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="print child output tails")
    args = ap.parse_args(argv)

    models = list(args.models)
    if args.prepare or args.force_prepare:
        prepared = prepare(force=args.force_prepare)
        if not models:
            models = prepared
    if not models:
        ap.error("no models given (pass paths or --prepare)")
    method = pick_method(args.rss_method)
    print(f"[e2e] rss method: {method}; harness RSS {_self_rss_mb():.0f} MB; cmd template: {args.cmd}", flush=True)

    reports: list[ModelReport] = []
    for model in models:
        model = os.path.abspath(model)
        if not os.path.exists(model):
            print(f"[e2e] missing model: {model}", file=sys.stderr)
            sys.exit(2)
        stem = os.path.splitext(os.path.basename(model))[0]
        out_dir = os.path.join(os.path.abspath(args.out_dir), stem)
        out = os.path.join(out_dir, f"{stem}.pruned.onnx")
        cmd = resolve_cmd(args.cmd, model, out, out_dir)
        if not cmd or (shutil.which(cmd[0]) is None and not os.access(cmd[0], os.X_OK)):
            print(f"[e2e] command not found: {cmd[:1]} (is onnxprune installed? use --cmd to override)",
                  file=sys.stderr)
            sys.exit(2)
        rep = ModelReport(model=model, disk=model_disk_info(model), cmd=shlex.join(cmd))
        ext = ", ".join(f"{k} {(v or 0) / 2**20:.1f}" for k, v in rep.disk["external"].items()) or "none"
        print(f"[e2e] {stem}: {rep.disk['total_bytes'] / 2**20:.1f} MiB on disk "
              f"(onnx {rep.disk['onnx_bytes'] / 2**20:.1f} MiB + external data: {ext})")
        print(f"[e2e]   $ {rep.cmd}", flush=True)
        for i in range(args.warmup + args.repeat):
            shutil.rmtree(out_dir, ignore_errors=True)
            os.makedirs(out_dir, exist_ok=True)
            r = measure(cmd, method=method, timeout=args.timeout)
            warm = i < args.warmup
            tag = "warmup" if warm else f"run {i - args.warmup + 1}/{args.repeat}"
            print(f"[e2e]   {tag}: rc={r.rc} wall={r.wall_s:.2f}s peak_rss={_fmt(r.peak_rss_mb, '.0f')} MiB "
                  f"{r.note}", flush=True)
            if r.rc != 0 or args.verbose:
                if r.stdout_tail.strip():
                    print("  stdout tail:\n" + r.stdout_tail.rstrip())
                if r.stderr_tail.strip():
                    print("  stderr tail:\n" + r.stderr_tail.rstrip())
            if not warm:
                rep.runs.append(r)
            rep.out_bytes = dir_size(out_dir)
        if not args.keep_output:
            shutil.rmtree(out_dir, ignore_errors=True)
        reports.append(rep)

    meta = {"cmd": args.cmd, "n": args.repeat, "method": method,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": sys.executable}
    print()
    print_table(reports, meta)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta,
                       "models": [{"summary": r.summary(), "disk": r.disk, "cmd": r.cmd,
                                   "runs": [asdict(x) for x in r.runs]} for r in reports]}, f, indent=2)
        print(f"[e2e] wrote {args.json}")
    if any(r.rc != 0 for rep in reports for r in rep.runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
