#!/usr/bin/env python3
"""Run the hitz benchmark suite: hitz, ``make`` and one-``bwrap``-per-task on
the same generated workloads, side by side, and print a Markdown report.

    python3 bench/run.py                       # trivial + cc, 5 reps, -j 2
    python3 bench/run.py --reps 3 --workload trivial
    python3 bench/run.py --workload fan --fan-tasks 10000 --tool hitz --tool make

Every measurement times a whole process with ``time.perf_counter`` around
``subprocess.run``, starting from a clean state (``build/`` and every cache
hitz may use deleted), and checks afterwards that the run really did the work
(the expected files, or the program's output). The report gives the median of
``--reps`` repetitions, the ratio to ``make`` and the per-task overhead
``(median - make median) / tasks``. A tool that fails or is missing is shown
in the table with its error; the other tools still run.

Reports go to stdout and to ``bench/out/results.md`` / ``results.json``.
See docs/benchmarks.md for the workloads and the targets.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("make", "bwrap", "hitz")
# State a run may leave behind in a workload folder; all of it is deleted
# before every repetition. XDG_CACHE_HOME points hitz's user cache in here too.
CLEAN = ("build", ".hitz", ".cache")
# Kept across repetitions: hitz's validated copy of the unchanged manifest
# (like make, which reads its Makefile each time but has nothing to validate).
# Everything else of .hitz/ (logs, history, staging) and every cache goes.
KEEP = (".hitz/manifest.json",)
# The targets docs/benchmarks.md states for hitz.
TARGET_PER_TASK_MS = 5.0
TARGET_CC_RATIO = 1.10


@dataclass
class Measurement:
    workload: str
    tasks: int
    tool: str
    times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def default_hitz() -> str:
    venv = REPO / ".venv" / "bin" / "hitz"
    return str(venv) if venv.exists() else (shutil.which("hitz") or "hitz")


def command(tool: str, jobs: int, hitz: str) -> list[str]:
    if tool == "hitz":
        return [hitz, "run", "--config", "hitz.toml", "-j", str(jobs)]
    if tool == "make":
        return ["make", f"-j{jobs}", "-s"]
    return ["bash", "run-bwrap.sh"]


def missing_tool(tool: str, hitz: str) -> str | None:
    exe = {"hitz": hitz, "make": "make", "bwrap": "bwrap"}[tool]
    if shutil.which(exe) is None:
        return f"`{exe}` not found" + (" (apt-get install bubblewrap)" if tool == "bwrap" else "")
    return None


def clean(workdir: Path) -> None:
    kept = {name: (workdir / name).read_bytes() for name in KEEP if (workdir / name).is_file()}
    for name in CLEAN:
        path = workdir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for name, data in kept.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_bytes(data)


def verify(workdir: Path, check: dict[str, object]) -> str | None:
    """None if the run produced what the workload expects, else what is wrong."""
    kind = check["kind"]
    if kind == "files":
        folder = workdir / str(check["dir"])
        found = len(list(folder.iterdir())) if folder.is_dir() else 0
        if found != check["count"]:
            return f"expected {check['count']} files in {check['dir']}/, found {found}"
    elif kind == "program":
        program = workdir / str(check["path"])
        if not program.exists():
            return f"{check['path']} was not built"
        out = subprocess.run([str(program)], capture_output=True, text=True, check=False)
        if out.stdout.strip() != check["stdout"]:
            return f"{check['path']} printed {out.stdout.strip()!r}, expected {check['stdout']!r}"
    return None


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def time_once(
    cmd: list[str], workdir: Path, env: dict[str, str], timeout: float, log: Path
) -> tuple[float, str | None]:
    """Seconds the whole process took, and an error message if it failed.
    The process's stderr goes to ``log``; its stdout is discarded."""
    with open(log, "w") as stderr:
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return time.perf_counter() - start, f"timed out after {timeout:.0f} s"
        except OSError as exc:
            return time.perf_counter() - start, f"could not start: {exc}"
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        detail = last_line(log.read_text(errors="replace"))
        return elapsed, f"exit {proc.returncode}" + (f": {detail}" if detail else "")
    return elapsed, None


def bench_workload(
    w: generate.Workload,
    out: Path,
    tools: list[str],
    reps: int,
    warmup: int,
    jobs: int,
    hitz: str,
    timeout: float,
) -> list[Measurement]:
    workdir = out / w.name
    generate.write(w, workdir)
    env = dict(os.environ, JOBS=str(jobs), XDG_CACHE_HOME=str(workdir / ".cache"))
    results = {t: Measurement(w.name, w.task_count(), t) for t in tools}
    for t in tools:
        results[t].error = missing_tool(t, hitz)
    print(f"# {w.name}: {w.task_count()} tasks in {workdir}", file=sys.stderr)
    for rep in range(-warmup, reps):
        # Rotate the order so no tool always runs first after the clean.
        order = tools[rep % len(tools) :] + tools[: rep % len(tools)]
        for t in order:
            m = results[t]
            if m.error:
                continue
            clean(workdir)
            log = out / f"{w.name}-{t}.log"
            elapsed, error = time_once(command(t, jobs, hitz), workdir, env, timeout, log)
            error = error or verify(workdir, w.check)
            label = "warm-up" if rep < 0 else f"rep {rep + 1}/{reps}"
            print(f"  {label:>9} {t:<6} {elapsed:8.3f} s  {error or 'ok'}", file=sys.stderr)
            if error:
                m.error = error
            elif rep >= 0:
                m.times.append(elapsed)
    clean(workdir)
    return [results[t] for t in tools]


def machine_info(hitz: str) -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "not found"
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "make": first_line(["make", "--version"]),
        "bwrap": first_line(["bwrap", "--version"]),
        "cc": first_line(["cc", "--version"]),
        "hitz": hitz,
        "commit": first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }


def fmt_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def report(results: list[Measurement], info: dict[str, str], args: argparse.Namespace) -> str:
    lines = [
        f"Measured {info['date']} by `bench/run.py` "
        f"(reps={args.reps}, warm-up={args.warmup}, -j {args.jobs}).",
        "",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['kernel']}",
        f"- python {info['python']}; {info['make']}; {info['bwrap']}; {info['cc']}",
        f"- hitz: `{info['hitz']}` (repo at {info['commit']})",
        "",
        "| workload | tasks | tool | median (s) | min (s) | vs make "
        "| overhead/task (ms) | status |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    make = {m.workload: m.median for m in results if m.tool == "make"}
    for m in results:
        base = make.get(m.workload)
        ratio = overhead = "—"
        if m.median is not None and base:
            ratio = f"{m.median / base:.2f}×"
            if m.tool != "make":
                overhead = f"{(m.median - base) / m.tasks * 1000:.2f}"
        status = f"error: {m.error}" if m.error else "ok"
        status = status.replace("|", "\\|")
        lines.append(
            f"| {m.workload} | {m.tasks} | {m.tool} | {fmt_s(m.median)} | "
            f"{fmt_s(min(m.times) if m.times else None)} | {ratio} | {overhead} | {status} |"
        )
    lines += ["", "Targets for hitz:", ""]
    for m in results:
        base = make.get(m.workload)
        if m.tool != "hitz" or m.median is None or not base:
            continue
        per_task = (m.median - base) / m.tasks * 1000
        verdict = "met" if per_task <= TARGET_PER_TASK_MS else "MISSED"
        lines.append(
            f"- {m.workload}: overhead {per_task:.2f} ms/task "
            f"(target ≤ {TARGET_PER_TASK_MS:g}) — {verdict}"
        )
        if m.workload == "cc":
            cc_ratio = m.median / base
            verdict = "met" if cc_ratio <= TARGET_CC_RATIO else "MISSED"
            lines.append(
                f"- cc: {cc_ratio:.2f}× make (target ≤ {TARGET_CC_RATIO:.2f}×) — {verdict}"
            )
    if lines[-1] == "":
        lines.append("- no hitz measurement (see the status column)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark hitz against make and bwrap-per-task.")
    p.add_argument(
        "--workload",
        action="append",
        choices=["trivial", "cc", "fan"],
        help="repeatable; default: trivial and cc",
    )
    p.add_argument("--tool", action="append", choices=TOOLS, help="repeatable; default: all")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument(
        "-j", "--jobs", type=int, default=2, help="parallel jobs for every tool (default 2)"
    )
    p.add_argument(
        "--hitz", default=default_hitz(), help="hitz executable (default: .venv/bin/hitz)"
    )
    p.add_argument("--trivial-tasks", type=int, default=500)
    p.add_argument("--cc-files", type=int, default=200)
    p.add_argument("--fan-tasks", type=int, default=1000)
    p.add_argument("--fan-width", type=int, help="default: a quarter of the tasks")
    p.add_argument("--fan-fanin", type=int, default=8)
    p.add_argument(
        "--timeout", type=float, default=900, help="seconds per run before it counts as failed"
    )
    p.add_argument(
        "--out", type=Path, default=REPO / "bench" / "out", help="work and report folder"
    )
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")

    sizes = {"trivial": args.trivial_tasks, "cc": args.cc_files, "fan": args.fan_tasks}
    tools = list(dict.fromkeys(args.tool or TOOLS))
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.hitz)
    results: list[Measurement] = []
    for name in dict.fromkeys(args.workload or ["trivial", "cc"]):
        w = generate.build(name, sizes[name], width=args.fan_width, fanin=args.fan_fanin)
        results += bench_workload(
            w, args.out, tools, args.reps, args.warmup, args.jobs, args.hitz, args.timeout
        )

    text = report(results, info, args)
    (args.out / "results.md").write_text(text)
    data = {
        "machine": info,
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": [
            {
                "workload": m.workload,
                "tasks": m.tasks,
                "tool": m.tool,
                "times_s": m.times,
                "median_s": m.median,
                "error": m.error,
            }
            for m in results
        ],
    }
    (args.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    print(text)
    print(f"(also written to {args.out / 'results.md'} and results.json)", file=sys.stderr)
    # Only a broken baseline fails the run: hitz and bwrap errors are results.
    return 1 if any(m.tool == "make" and m.error for m in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
