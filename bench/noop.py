#!/usr/bin/env python3
"""Benchmark what a rebuild costs when there is (almost) nothing to do.

    python3 bench/noop.py                  # all cases, median of 5
    python3 bench/noop.py --reps 3 --case fan-noop
    python3 bench/noop.py --write-docs     # also append the table to docs/benchmarks.md

Cases (whole processes, timed with ``time.perf_counter`` around
``subprocess.run``, like ``bench/run.py``):

- **no-op**: the workload was built, nothing changed, run it again. hitz
  against ``make`` on the same graph: the fan workload (10,000 tasks by
  default), trivial (500) and cc (202). The fan's generated Makefile has only
  phony targets (its tasks make no files), so ``make`` runs all 10,000
  commands again; a second Makefile, ``Makefile.stamps``, gives every task a
  stamp file, which is what a real no-op of ``make`` costs. The targets:
  hitz ≤ 0.25 s on the fan; references ``make`` 0.036 s and Bazel with its
  server running 0.59 s (figures from the issue).
- **warm cache after deleting outputs**: the workload was built (so the
  cache holds every result), ``build/`` is deleted, run it again: every
  output comes back from the cache. trivial (500 tasks), cc (202) and big
  (8 tasks of 64 MiB each, made here). ``make`` has no cache; its full
  rebuild is shown for scale. References: Bazel ``--disk_cache`` 0.87 s,
  0.57 s and 1.18 s (figures from the issue).

Bazel is not installed on the machines this runs on (Debian 12 packages only
``bazel-bootstrap`` 4.2.3): if ``bazel`` is not on PATH it is skipped, and
the report says so and quotes the reference figures instead.

hitz runs with bytecode caching on (``PYTHONDONTWRITEBYTECODE`` removed from
its environment) as an installed hitz would, each workload with its own
cache (``HITZ_CACHE_DIR``). Outputs a run has just written are recorded as
up to date only once they are 2 s old (see ``executor/uptodate.py``), so
before timing no-op runs this waits that long and runs once untimed.
Every timed run is checked: exit status 0, and for hitz the summary line on
stderr (all tasks from the cache) and the workload's check (bench/run.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate
import run as suite

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
HEADING = "## No-op and warm-cache rebuilds"
TARGET_FAN_NOOP_S = 0.25
REFERENCES = {  # from the issue, measured on a machine of this kind
    ("no-op", "fan"): "make 0.036 s; Bazel (server running) 0.59 s",
    ("warm cache", "trivial"): "Bazel --disk_cache 0.87 s",
    ("warm cache", "cc"): "Bazel --disk_cache 0.57 s",
    ("warm cache", "big"): "Bazel --disk_cache 1.18 s",
}
BIG_FILES, BIG_MIB = 8, 64


@dataclass
class Row:
    case: str  # "no-op" or "warm cache"
    workload: str
    tasks: int
    tool: str
    times: list[float] = field(default_factory=list)
    error: str | None = None
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def big() -> generate.Workload:
    """8 tasks, each writing 64 MiB of random bytes (incompressible)."""
    tasks = [
        generate.Task(name=f"big{i}", command=f"head -c {BIG_MIB}M /dev/urandom > "
                      f"{generate.BUILD}/big/{i}.bin", outputs=[f"{generate.BUILD}/big/{i}.bin"])
        for i in range(BIG_FILES)
    ]
    return generate.Workload("big", tasks, {}, {"kind": "files", "dir": f"{generate.BUILD}/big",
                                                 "count": BIG_FILES})


def stamps_makefile(w: generate.Workload) -> str:
    """The workload's graph with one stamp file per task: a real ``make`` no-op."""
    lines = ["MAKEFLAGS += --no-builtin-rules", ".SUFFIXES:", "",
             "all: " + " ".join(f"build/stamp/{t.name}" for t in w.tasks), ""]
    for t in w.tasks:
        deps = " ".join(f"build/stamp/{d}" for d in t.needs + t.after)
        lines += [f"build/stamp/{t.name}: {deps} | build/stamp", "\t@touch $@", ""]
    lines += ["build/stamp:", "\t@mkdir -p $@", ""]
    return "\n".join(lines)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def hitz(self) -> list[str]:
        return [self.args.hitz, "run", "--config", "hitz.toml", "-j", str(self.args.jobs)]

    def once(self, cmd: list[str], workdir: Path, env: dict[str, str]) -> tuple[float, str, str]:
        """Seconds, an error ("" if none), the last line of stderr."""
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=self.args.timeout, check=False)
        elapsed = time.perf_counter() - start
        last = suite.last_line(proc.stderr)
        return elapsed, "" if proc.returncode == 0 else f"exit {proc.returncode}: {last}", last

    def prepare(self, w: generate.Workload) -> tuple[Path, dict[str, str]]:
        workdir = self.args.out / f"noop-{w.name}"
        generate.write(w, workdir)
        (workdir / "Makefile.stamps").write_text(stamps_makefile(w))
        env = dict(self.env, HITZ_CACHE_DIR=str(workdir / ".cache"), JOBS=str(self.args.jobs))
        return workdir, env

    def timed(self, row: Row, cmd: list[str], workdir: Path, env: dict[str, str],
              before: list[str] | None = None, check: dict[str, object] | None = None,
              all_cached: bool = False) -> Row:
        for rep in range(self.args.reps):
            if before:
                for name in before:
                    shutil.rmtree(workdir / name, ignore_errors=True)
            elapsed, error, last = self.once(cmd, workdir, env)
            if not error and all_cached and f"({row.tasks} from the cache)" not in last:
                error = f"not all tasks came from the cache: {last}"
            if not error and check is not None:
                error = suite.verify(workdir, check) or ""
            print(f"  {row.case:>10} {row.workload:<8} {row.tool:<14} rep {rep + 1}/"
                  f"{self.args.reps} {elapsed:7.3f} s  {error or 'ok'}", file=sys.stderr)
            if error:
                row.error = error
                break
            row.times.append(elapsed)
        return row

    def build(self, w: generate.Workload, workdir: Path, env: dict[str, str]) -> str:
        """Build once with hitz (fills the cache), wait until the outputs are old
        enough to be recorded, and run once more (records them)."""
        for _ in range(2):
            _, error, _ = self.once(self.hitz(), workdir, env)
            if error:
                return error
            time.sleep(2.1)
        return ""

    def noop(self, w: generate.Workload) -> list[Row]:
        workdir, env = self.prepare(w)
        n = w.task_count()
        rows = []
        hitz = Row("no-op", w.name, n, "hitz")
        hitz.error = self.build(w, workdir, env) or None
        if hitz.error is None:
            self.timed(hitz, self.hitz(), workdir, env, check=w.check, all_cached=True)
        rows.append(hitz)
        if shutil.which("make"):
            make = Row("no-op", w.name, n, "make")
            if w.name == "fan":
                make.note = "generated Makefile: phony targets, every command runs again"
            subprocess.run(["make", "-s", f"-j{self.args.jobs}"], cwd=workdir, env=env,
                           capture_output=True, check=False)
            rows.append(self.timed(make, ["make", "-s", f"-j{self.args.jobs}"], workdir, env))
            if w.name == "fan":
                stamps = Row("no-op", w.name, n, "make (stamps)",
                             note="one stamp file per task: a real make no-op")
                cmd = ["make", "-s", f"-j{self.args.jobs}", "-f", "Makefile.stamps"]
                subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, check=False)
                rows.append(self.timed(stamps, cmd, workdir, env))
        rows.append(self.bazel("no-op", w))
        shutil.rmtree(workdir)
        return rows

    def warm(self, w: generate.Workload) -> list[Row]:
        workdir, env = self.prepare(w)
        n = w.task_count()
        hitz = Row("warm cache", w.name, n, "hitz")
        _, error, _ = self.once(self.hitz(), workdir, env)
        hitz.error = error or None
        if hitz.error is None:
            self.timed(hitz, self.hitz(), workdir, env, before=[generate.BUILD], check=w.check,
                       all_cached=True)
        rows = [hitz]
        if shutil.which("make"):
            make = Row("warm cache", w.name, n, "make",
                       note="no cache: a full rebuild, for scale")
            rows.append(self.timed(make, ["make", "-s", f"-j{self.args.jobs}"], workdir, env,
                                   before=[generate.BUILD], check=w.check))
        rows.append(self.bazel("warm cache", w))
        shutil.rmtree(workdir)
        return rows

    def bazel(self, case: str, w: generate.Workload) -> Row:
        row = Row(case, w.name, w.task_count(), "bazel")
        reference = REFERENCES.get((case, w.name), "")
        if shutil.which("bazel") is None:
            row.error = "not installed here: skipped"
        else:
            row.error = "installed, but bench/noop.py has no Bazel runner yet: skipped"
        row.note = f"reference: {reference}" if reference else ""
        return row


def report(rows: list[Row], info: dict[str, str], args: argparse.Namespace) -> str:
    lines = [
        f"Measured {info['date']} by `bench/noop.py` (median of {args.reps}, -j {args.jobs}).",
        "",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['kernel']}",
        f"- python {info['python']}; {info['make']}; {info['cc']}",
        f"- hitz: `{info['hitz']}` (repo at {info['commit']})",
        "",
        "| case | workload | tasks | tool | median (s) | min (s) | notes |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        notes = "; ".join(x for x in (r.error and f"**{r.error}**", r.note) if x)
        lines.append(f"| {r.case} | {r.workload} | {r.tasks} | {r.tool} | "
                     f"{suite.fmt_s(r.median)} | {suite.fmt_s(min(r.times) if r.times else None)}"
                     f" | {notes.replace('|', '/')} |")
    fan = next((r for r in rows if (r.case, r.workload, r.tool) == ("no-op", "fan", "hitz")),
               None)
    if fan is not None and fan.median is not None:
        verdict = "met" if fan.median <= TARGET_FAN_NOOP_S else "MISSED"
        lines += ["", f"Target: no-op of the {fan.tasks}-task fan ≤ {TARGET_FAN_NOOP_S} s with no "
                  f"daemon: {fan.median:.3f} s, {verdict}."]
    return "\n".join(lines) + "\n"


def write_docs(text: str, title: str) -> None:
    """Append the report under ``HEADING`` (added at the end if missing), as
    a subsection titled ``title`` (the date, and what was measured)."""
    docs = DOCS.read_text()
    if HEADING not in docs:
        docs = docs.rstrip("\n") + f"\n\n{HEADING}\n\n" + (
            "What a rebuild costs when there is nothing (or only restoring) to do;\n"
            "`bench/noop.py` measures it, and says how in its docstring. Newest last.\n")
    DOCS.write_text(docs.rstrip("\n") + f"\n\n### {title}\n\n{text}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark no-op and warm-cache rebuilds.")
    p.add_argument("--case", action="append",
                   choices=["fan-noop", "trivial-noop", "cc-noop", "trivial-warm", "cc-warm",
                            "big-warm"],
                   help="repeatable; default: all")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("-j", "--jobs", type=int, default=2)
    p.add_argument("--fan-tasks", type=int, default=10000)
    p.add_argument("--hitz", default=suite.default_hitz())
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--write-docs", action="store_true",
                   help=f"append the report to docs/benchmarks.md under {HEADING!r}")
    p.add_argument("--label", help="with --write-docs: words after the date in its heading")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = args.case or ["fan-noop", "trivial-noop", "cc-noop", "trivial-warm", "cc-warm",
                          "big-warm"]
    bench = Bench(args)
    info = suite.machine_info(args.hitz)
    rows: list[Row] = []
    for case in cases:
        name, kind = case.split("-")
        w = big() if name == "big" else generate.build(
            name, args.fan_tasks if name == "fan" else None)
        print(f"# {case}: {w.task_count()} tasks", file=sys.stderr)
        rows += bench.noop(w) if kind == "noop" else bench.warm(w)
    text = report(rows, info, args)
    print(text)
    if args.write_docs:
        date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        write_docs(text, f"{date}, {args.label}" if args.label else date)
        print(f"(appended to {DOCS})", file=sys.stderr)
    return 1 if any(r.error for r in rows if r.tool == "hitz") else 0


if __name__ == "__main__":
    raise SystemExit(main())
