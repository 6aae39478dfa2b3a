#!/usr/bin/env python3
"""Generate benchmark workloads: one folder per workload holding the same task
graph three ways, so hitz, make and bubblewrap run exactly the same commands.

    <out>/hitz.toml      the hitz manifest
    <out>/Makefile       the equivalent Makefile (``make -jN``)
    <out>/run-bwrap.sh   one ``bwrap`` sandbox per task, N at a time
    <out>/src/ ...       generated sources, if the workload has any
    <out>/workload.json  name, task count and the check the runner applies

Workloads:

    trivial  N independent tasks, each writing a tiny file (default N=500)
    cc       N small generated C files compiled one per task, then linked into
             one program (default N=200; N+2 tasks with main.c and the link)
    fan      N no-op tasks (``true``) in a layered graph with wide fan-out
             and fan-in: one source task, layers of WIDTH tasks that each need
             FANIN tasks of the layer before (the first layer needs the
             source), and one sink that needs the whole last layer

Usage (the runner calls the same functions):

    python3 bench/generate.py trivial --out /tmp/w
    python3 bench/generate.py fan --tasks 10000 --width 2500 --fanin 8 --out /tmp/fan

Only the standard library is used, so any python3 >= 3.11 runs this.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

# Everything a task writes lives under build/, so deleting it is a clean state.
BUILD = "build"


@dataclass
class Task:
    """One task as all three runners see it.

    ``command`` is a shell command line (run as ``/bin/sh -c``) when ``argv``
    is empty; otherwise ``argv`` is executed directly by all three runners.
    """

    name: str
    command: str = ""
    argv: tuple[str, ...] = ()
    inputs: list[str] = field(default_factory=list)  # files relative to the workload dir
    needs: list[str] = field(default_factory=list)  # tasks whose outputs this task reads
    after: list[str] = field(default_factory=list)  # tasks that must finish first (no files)
    outputs: list[str] = field(default_factory=list)  # files relative to the workload dir


@dataclass
class Workload:
    name: str
    tasks: list[Task]
    files: dict[str, str]  # generated sources: relative path -> text
    check: dict[str, object]  # how the runner verifies a run did the work

    def task_count(self) -> int:
        return len(self.tasks)


# --------------------------------------------------------------------------
# The three workloads


def trivial(n: int = 500) -> Workload:
    tasks = [
        Task(
            name=f"t{i:05d}",
            command=f"echo {i} > {BUILD}/t/t{i:05d}.txt",
            outputs=[f"{BUILD}/t/t{i:05d}.txt"],
        )
        for i in range(n)
    ]
    return Workload("trivial", tasks, {}, {"kind": "files", "dir": f"{BUILD}/t", "count": n})


def _c_table(i: int) -> list[int]:
    return [(i * 7 + k * 13) % 251 for k in range(16)]


def _c_value(i: int) -> int:
    """What generated function f<i>(i) returns; mirrors the C code below."""
    acc = i
    for k, t in enumerate(_c_table(i)):
        acc = (acc * 33 + t + (i ^ k)) & 0xFFFFFF
    return acc


def cc(n: int = 200) -> Workload:
    files: dict[str, str] = {}
    header = ["#ifndef FUNCS_H", "#define FUNCS_H", ""]
    header += [f"unsigned f{i:04d}(unsigned x);" for i in range(n)]
    header += ["", "#endif", ""]
    files["include/funcs.h"] = "\n".join(header)
    for i in range(n):
        table = ", ".join(str(t) for t in _c_table(i))
        files[f"src/f{i:04d}.c"] = f"""#include "funcs.h"

static const unsigned table[16] = {{{table}}};

static unsigned mix(unsigned acc, unsigned t, unsigned x, unsigned k)
{{
    return (acc * 33u + t + (x ^ k)) & 0xffffffu;
}}

unsigned f{i:04d}(unsigned x)
{{
    unsigned acc = {i}u;
    unsigned k;

    for (k = 0; k < 16; k++)
        acc = mix(acc, table[k], x, k);
    return acc;
}}
"""
    calls = "\n".join(f"    total += f{i:04d}({i}u);" for i in range(n))
    files["src/main.c"] = f"""#include <stdio.h>

#include "funcs.h"

int main(void)
{{
    unsigned long total = 0;

{calls}
    printf("{n} %lu\\n", total);
    return 0;
}}
"""
    cflags = "-O2 -Iinclude"
    tasks = []
    objects = []
    for stem in [f"f{i:04d}" for i in range(n)] + ["main"]:
        obj = f"{BUILD}/obj/{stem}.o"
        objects.append(obj)
        tasks.append(
            Task(
                name=f"cc_{stem}",
                argv=("cc", *cflags.split(), "-c", f"src/{stem}.c", "-o", obj),
                inputs=[f"src/{stem}.c", "include/funcs.h"],
                outputs=[obj],
            )
        )
    tasks.append(
        Task(
            name="link",
            argv=("cc", "-o", f"{BUILD}/app", *objects),
            needs=[t.name for t in tasks],
            outputs=[f"{BUILD}/app"],
        )
    )
    expected = f"{n} {sum(_c_value(i) for i in range(n))}"
    return Workload(
        "cc", tasks, files, {"kind": "program", "path": f"{BUILD}/app", "stdout": expected}
    )


def fan(n: int = 1000, width: int | None = None, fanin: int = 8, seed: int = 1) -> Workload:
    """N no-op tasks: source -> layers of ``width`` -> sink (see module docstring)."""
    if n < 3:
        raise ValueError("fan needs at least 3 tasks (source, one middle task, sink)")
    middle = n - 2
    width = width or max(1, middle // 4)
    rng = random.Random(seed)
    names = [f"n{i:05d}" for i in range(n)]
    source, sink = names[0], names[-1]
    tasks = [Task(name=source, argv=("true",))]
    previous = [source]
    rest = names[1:-1]
    while rest:
        layer, rest = rest[:width], rest[width:]
        for name in layer:
            after = sorted(rng.sample(previous, min(fanin, len(previous))))
            tasks.append(Task(name=name, argv=("true",), after=after))
        previous = layer
    tasks.append(Task(name=sink, argv=("true",), after=list(previous)))
    return Workload("fan", tasks, {}, {"kind": "exit-status"})


# --------------------------------------------------------------------------
# Writers: the same graph as a hitz manifest, a Makefile and a bwrap script


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def _toml_list(items: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(_toml_str(s) for s in items) + "]"


def hitz_manifest(w: Workload) -> str:
    lines = [
        f"# Generated by bench/generate.py: workload {w.name!r}, {w.task_count()} tasks.",
        "[project]",
        f"name = {_toml_str('bench-' + w.name)}",
        "",
        "[defaults]",
        'network = "none"',
        'timeout = "10m"',
        "",
    ]
    for t in w.tasks:
        lines.append(f"[tasks.{t.name}]")
        lines.append(f"run = {_toml_list(t.argv) if t.argv else _toml_str(t.command)}")
        inputs = t.inputs + [":" + d for d in t.needs]
        if inputs:
            lines.append(f"inputs = {_toml_list(inputs)}")
        if t.outputs:
            lines.append(f"outputs = {_toml_list(t.outputs)}")
        if t.after:
            lines.append(f"deps = {_toml_list(t.after)}")
        lines.append("")
    return "\n".join(lines)


def _recipe(t: Task) -> str:
    return shlex.join(t.argv) if t.argv else t.command


def makefile(w: Workload) -> str:
    """File targets for tasks with outputs, phony targets for the rest.

    Output folders are order-only prerequisites, created once, as hitz
    creates output locations before a task runs.
    """
    by_name = {t.name: t for t in w.tasks}

    def target(t: Task) -> str:
        return t.outputs[0] if t.outputs else t.name

    dirs = sorted({str(Path(o).parent) for t in w.tasks for o in t.outputs})
    phony = [t.name for t in w.tasks if not t.outputs]
    lines = [
        f"# Generated by bench/generate.py: workload {w.name!r}, {w.task_count()} tasks.",
        "MAKEFLAGS += --no-builtin-rules",
        ".SUFFIXES:",
        "",
        "all: " + " ".join(target(t) for t in w.tasks),
        "",
        ".PHONY: all " + " ".join(phony),
        "",
    ]
    for t in w.tasks:
        prereqs = t.inputs + [target(by_name[d]) for d in t.needs + t.after]
        extra = t.outputs[1:]
        head = target(t) + (" " + " ".join(extra) if extra else "")
        order_only = sorted({str(Path(o).parent) for o in t.outputs})
        line = f"{head}:" + "".join(" " + p for p in prereqs)
        if order_only:
            line += " | " + " ".join(order_only)
        lines += [line, f"\t@{_recipe(t)}", ""]
    for d in dirs:
        lines += [f"{d}:", "\t@mkdir -p $@", ""]
    return "\n".join(lines)


BWRAP_PRELUDE = r"""#!/usr/bin/env bash
# Generated by bench/generate.py: workload {name!r}, {count} tasks.
# One bubblewrap sandbox per task, at most $JOBS at a time (default 2); tasks
# run level by level in dependency order, each level a barrier.
set -euo pipefail

W=$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)
JOBS=${{JOBS:-2}}
cd "$W"

# Isolation close to a hitz task: new user, pid, net, ipc, uts and cgroup
# namespaces; read-only /usr with the merged-/usr symlinks; private /proc,
# /dev and /tmp; the workload folder at /work; a clean environment.
# /etc/alternatives is exposed because Debian's /usr/bin/cc points into it.
BWRAP=(bwrap --unshare-all --die-with-parent
    --ro-bind /usr /usr
    --symlink usr/bin /bin --symlink usr/sbin /sbin --symlink usr/lib /lib)
if [[ -d /usr/lib64 ]]; then BWRAP+=(--symlink usr/lib64 /lib64); fi
if [[ -d /etc/alternatives ]]; then BWRAP+=(--ro-bind /etc/alternatives /etc/alternatives); fi
BWRAP+=(--proc /proc --dev /dev --tmpfs /tmp
    --bind "$W" /work --chdir /work
    --clearenv --setenv PATH /usr/local/bin:/usr/bin:/bin --setenv HOME /tmp
    --setenv LANG C.UTF-8)

failed=0
running=0

# spawn ARGV...: start one sandboxed task once fewer than $JOBS are running.
spawn() {{
    if (( running >= JOBS )); then
        wait -n || failed=1
        running=$((running - 1))
    fi
    "${{BWRAP[@]}}" -- "$@" &
    running=$((running + 1))
}}

# barrier: wait for every running task (the end of a level).
barrier() {{
    while (( running > 0 )); do
        wait -n || failed=1
        running=$((running - 1))
    done
    if (( failed )); then
        echo "run-bwrap.sh: a task failed" >&2
        exit 1
    fi
}}

"""


def _levels(w: Workload) -> list[list[Task]]:
    level: dict[str, int] = {}
    for t in w.tasks:  # generators emit tasks after everything they need
        deps = t.needs + t.after
        level[t.name] = 1 + max((level[d] for d in deps), default=-1)
    out: list[list[Task]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for t in w.tasks:
        out[level[t.name]].append(t)
    return out


def bwrap_script(w: Workload) -> str:
    parts = [BWRAP_PRELUDE.format(name=w.name, count=w.task_count())]
    dirs = sorted({str(Path(o).parent) for t in w.tasks for o in t.outputs})
    if dirs:
        parts.append(f"mkdir -p {shlex.join(dirs)}\n")
    for i, level in enumerate(_levels(w)):
        parts.append(f"\n# level {i}: {len(level)} task(s)\n")
        for t in level:
            argv = t.argv if t.argv else ("/bin/sh", "-c", t.command)
            parts.append(f"spawn {shlex.join(argv)}\n")
        parts.append("barrier\n")
    return "".join(parts)


# --------------------------------------------------------------------------


def write(w: Workload, out: Path) -> None:
    """Write the workload into ``out``, replacing whatever was there."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for rel, text in w.files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (out / "hitz.toml").write_text(hitz_manifest(w))
    (out / "Makefile").write_text(makefile(w))
    script = out / "run-bwrap.sh"
    script.write_text(bwrap_script(w))
    script.chmod(0o755)
    meta = {"name": w.name, "tasks": w.task_count(), "check": w.check}
    (out / "workload.json").write_text(json.dumps(meta, indent=2) + "\n")


def build(
    name: str, tasks: int | None = None, width: int | None = None, fanin: int = 8
) -> Workload:
    """The named workload with its default size unless ``tasks`` is given."""
    if name == "trivial":
        return trivial(tasks or 500)
    if name == "cc":
        return cc(tasks or 200)
    if name == "fan":
        return fan(tasks or 1000, width=width, fanin=fanin)
    raise ValueError(f"unknown workload {name!r}: expected trivial, cc or fan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("workload", choices=["trivial", "cc", "fan"])
    p.add_argument("--out", type=Path, required=True, help="folder to (re)create")
    p.add_argument("--tasks", type=int, help="task count (cc: number of generated C files)")
    p.add_argument("--width", type=int, help="fan: tasks per layer (default: a quarter)")
    p.add_argument("--fanin", type=int, default=8, help="fan: deps per task (default 8)")
    args = p.parse_args(argv)
    w = build(args.workload, args.tasks, args.width, args.fanin)
    write(w, args.out)
    print(f"wrote {w.name} ({w.task_count()} tasks) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
