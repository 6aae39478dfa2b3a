#!/usr/bin/env python3
"""Per-task overhead of hitz's docker backend against a plain `docker run --rm` loop.

    python3 bench/docker_bench.py                 # 40 tasks, -j 2, median of 3
    python3 bench/docker_bench.py --tasks 80 --jobs 2 --reps 5

The same workload both ways: N tasks that each run ``/bin/true`` in a small
busybox image (imported here from Debian's busybox-static, as the tests do),
J at a time, with no network.

- **docker run**: ``docker run --rm --network none --read-only IMAGE /bin/true``,
  N times, J at a time (``xargs -P J``), the whole loop timed.
- **hitz**: ``hitz run --no-cache -j J`` on a manifest of N independent
  docker tasks (whole process, start-up included), timed the same way.

Per-task overhead = (total - N * W / J) / N, W being what a task itself
takes (``--work W``: it runs ``sleep W``; 0, the default, runs ``/bin/true``). The ratio
hitz / docker run is what issue 5 bounds (at most 0.5). Whole-process
timings with ``time.perf_counter`` around ``subprocess.run``; medians.
The machine is shared: the table says when it ran and the load average
(1 minute) before and after. Prints a Markdown table; ``--write-docs``
appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
IMAGE_NAME = "hitz-bench/busybox"


def import_busybox(work: Path) -> str:
    """Build and import the busybox image; return its ID."""
    subprocess.run(["apt-get", "download", "busybox-static"], cwd=work, check=True,
                   capture_output=True)
    deb = next(work.glob("busybox-static_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, link in (("bin", None), ("bin/busybox", None), ("bin/sh", "busybox"),
                           ("bin/true", "busybox"), ("bin/sleep", "busybox")):
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 315532800, 0o755
            if name == "bin":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif link:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                content = (work / "root/bin/busybox").read_bytes()
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    subprocess.run(["docker", "import", "-", f"{IMAGE_NAME}:latest"], input=data.getvalue(),
                   check=True, capture_output=True)
    out = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", f"{IMAGE_NAME}:latest"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return out


def task_argv(work: float) -> list[str]:
    return ["/bin/sleep", f"{work:g}"] if work > 0 else ["/bin/true"]


def time_docker_loop(image: str, tasks: int, jobs: int, work: float) -> float:
    args = "\n".join(str(i) for i in range(tasks)) + "\n"
    started = time.perf_counter()
    subprocess.run(["xargs", "-P", str(jobs), "-I{}", "docker", "run", "--rm", "--network",
                    "none", "--read-only", image, *task_argv(work)],
                   input=args, text=True, check=True, capture_output=True)
    return time.perf_counter() - started


def time_hitz(project: Path, jobs: int) -> float:
    env = dict(os.environ, NO_COLOR="1", HITZ_CACHE_DIR=str(project / ".bench-cache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.perf_counter()
    proc = subprocess.run([PYTHON, "-m", "hitz.executor", "run", "--config", "hitz.toml",
                           "--no-cache", "-j", str(jobs)], cwd=project, env=env,
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"hitz failed:\n{proc.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work", type=float, default=0.0,
                        help="seconds each task sleeps (0: it runs /bin/true)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="hitz-docker-bench-") as tmp:
        work = Path(tmp)
        image_id = import_busybox(work)
        project = work / "proj"
        project.mkdir()
        rootfs = f"docker:{IMAGE_NAME}@{image_id}"
        tasks = "".join(
            f"[tasks.t{i}]\nrun = {json.dumps(task_argv(args.work))}\nbackend = \"docker\"\n"
            f"rootfs = {json.dumps(rootfs)}\nenv = {{ N = \"{i}\" }}\n\n"
            for i in range(args.tasks))
        (project / "hitz.toml").write_text(tasks)
        time_hitz(project, args.jobs)  # warm: the container init is built once per machine
        time_docker_loop(image_id, 2, 1, 0.0)
        docker_runs, hitz_runs = [], []
        for _ in range(args.reps):
            docker_runs.append(time_docker_loop(image_id, args.tasks, args.jobs, args.work))
            hitz_runs.append(time_hitz(project, args.jobs))
        subprocess.run(["docker", "rmi", "-f", f"{IMAGE_NAME}:latest"], capture_output=True,
                       check=False)
    load_after = os.getloadavg()[0]
    docker_s, hitz_s = statistics.median(docker_runs), statistics.median(hitz_runs)
    # What the tasks themselves take, J at a time; the rest is overhead.
    ideal = args.tasks * args.work / args.jobs
    per_docker = (docker_s - ideal) / args.tasks
    per_hitz = (hitz_s - ideal) / args.tasks
    what = f"`sleep {args.work:g}`" if args.work > 0 else "`/bin/true`"
    table = (
        f"\n### Docker backend: per-task overhead ({args.tasks} tasks of {what}, "
        f"-j {args.jobs}, median of {args.reps})\n\n"
        f"{when}, load average {load_before:.1f} → {load_after:.1f}\n\n"
        "| runner | whole run (s) | overhead per task (ms) |\n|---|---:|---:|\n"
        f"| `docker run --rm` loop (`xargs -P {args.jobs}`) | {docker_s:.2f} | "
        f"{per_docker * 1000:.0f} |\n"
        f"| `hitz run --no-cache` (docker backend) | {hitz_s:.2f} | {per_hitz * 1000:.0f} |\n"
        f"\nratio hitz / docker run: **{per_hitz / per_docker:.2f}** (target: at most 0.5)\n"
    )
    print(table)
    print(f"raw docker: {[round(x, 3) for x in docker_runs]}  hitz: "
          f"{[round(x, 3) for x in hitz_runs]}", file=sys.stderr)
    if args.write_docs:
        with open(REPO / "docs/benchmarks.md", "a") as f:
            f.write(table)


if __name__ == "__main__":
    main()
