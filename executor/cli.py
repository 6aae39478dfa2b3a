"""The `hitz` command line. The only place a HitzError becomes text and an
exit status: 0 success, 1 a task failed, 2 usage or manifest error,
130 interrupted. Imports are lazy so `hitz --help` and no-op runs start fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn, TextIO

from hitz.executor.errors import HitzError, Interrupted, UsageError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from hitz.executor.events import RunObserver
    from hitz.executor.model import Manifest, TaskDef
    from hitz.executor.remote_tier import RemoteTier
    from hitz.executor.runner import Runner
    from hitz.sandbox.policy import Policy
    from hitz.sandbox.spec import SandboxBackend

VERSION = "0.1.0"
DEFAULT_CONFIG = "hitz.toml"
COMMANDS = (
    "run", "validate", "plan", "graph", "schema", "sandbox", "explain", "cache", "doctor",
    "image", "worker",
)


class _Parser(argparse.ArgumentParser):
    """argparse, with errors in hitz's voice (exit status 2, a hint)."""

    def error(self, message: str) -> NoReturn:
        hint = f"see `{self.prog} --help`"
        if "invalid choice:" in message and self.prog == "hitz":
            word = message.split("invalid choice: ")[1].split("'")[1]
            from hitz.executor.suggest import suggest

            near = suggest(word, COMMANDS)
            message = f"unknown command `{word}`"
            if near:
                hint = f"did you mean `hitz {near}`?"
        raise UsageError(message, hint=hint)


def _parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="hitz", description="Run a declared graph of tasks, each in a hermetic sandbox."
    )
    top.add_argument("--version", action="version", version=f"hitz {VERSION}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "-c",
            "--config",
            default=DEFAULT_CONFIG,
            metavar="FILE",
            help=f"the manifest (default: {DEFAULT_CONFIG})",
        )
        return p

    run = with_config(sub.add_parser("run", help="run tasks (default: all) and what they need"))
    run.add_argument("targets", nargs="*", metavar="TARGET", help="task names, `build` or `:build`")
    run.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="tasks to run at once (default: number of CPUs)",
    )
    run.add_argument(
        "-k",
        "--keep-going",
        action="store_true",
        help="keep running tasks that do not depend on a failed one",
    )
    run.add_argument(
        "--json", action="store_true", help="write a machine-readable summary to stdout"
    )
    run.add_argument("--explain", action="store_true",
                     help="say why each task that runs was not served from the cache")
    run.add_argument("--no-cache", action="store_true",
                     help="neither read nor write the cache in this run")
    run.add_argument("--remote", metavar="URL",
                     help="also use this REAPI remote cache, grpc://HOST:PORT or grpcs://HOST:PORT"
                     " (over [cache] remote and $HITZ_REMOTE_CACHE)")
    run.add_argument("--no-remote", action="store_true",
                     help="use only the local cache in this run")
    run.add_argument("--remote-executor", metavar="URL",
                     help='run tasks with backend = "remote" on this REAPI execution server,'
                     " grpc://HOST:PORT (over [remote] executor and $HITZ_REMOTE_EXECUTOR)")

    explain_cmd = with_config(sub.add_parser(
        "explain", help="say whether a task would come from the cache, and why not"))
    explain_cmd.add_argument("task", metavar="TASK")

    cache = sub.add_parser("cache", help="inspect, trim or serve the local cache")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="SUBCOMMAND",
                                     parser_class=_Parser, required=True)
    with_config(cache_sub.add_parser("stats", help="entries, size and the last run's hits"))
    gc = with_config(cache_sub.add_parser("gc", help="evict least recently used entries"))
    gc.add_argument("--max-size", metavar="SIZE",
                    help='shrink the cache to this size, such as "1GiB" (default: '
                    "[cache] max_size, else 10GiB)")
    serve = cache_sub.add_parser("serve", help="serve the local cache to REAPI clients (Bazel...)")
    serve.add_argument("--listen", default="127.0.0.1:8980", metavar="HOST:PORT",
                       help="the address to listen on (default: 127.0.0.1:8980; port 0: any)")
    serve.add_argument("--cache-dir", metavar="DIR",
                       help="the cache folder (default: $HITZ_CACHE_DIR, else "
                       "$XDG_CACHE_HOME/hitz, else ~/.cache/hitz)")

    with_config(sub.add_parser("validate", help="check the manifest and its graph; run nothing"))

    plan = with_config(sub.add_parser("plan", help="print the run order and priorities"))
    plan.add_argument("targets", nargs="*", metavar="TARGET")

    graph = with_config(sub.add_parser("graph", help="print the task graph"))
    graph.add_argument("targets", nargs="*", metavar="TARGET")
    graph.add_argument("--format", choices=("dot", "mermaid"), default="dot")

    sub.add_parser("schema", help="print the manifest's JSON Schema")

    worker = sub.add_parser(
        "worker", help="run leases of a REAPI server (BuildGrid) in hitz's sandbox")
    worker.add_argument("--server", required=True, metavar="URL",
                        help="the server's Bots service, grpc://HOST:PORT or grpcs://HOST:PORT")
    worker.add_argument("--instance", default="", metavar="NAME",
                        help='the REAPI instance name (default: "")')
    worker.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                        help="leases to run at once (default: 1)")
    worker.add_argument("--work-dir", metavar="DIR",
                        help="where leases' input roots are written (default: a temp folder)")

    doctor = sub.add_parser("doctor", help="what this host can enforce")
    doctor.add_argument("--json", action="store_true", help="write the checks as JSON to stdout")

    _image_parser(sub, with_config)

    sandbox = sub.add_parser("sandbox", help="inspect the sandbox of a task")
    sandbox_sub = sandbox.add_subparsers(
        dest="sandbox_command", metavar="SUBCOMMAND", parser_class=_Parser, required=True
    )
    explain = with_config(
        sandbox_sub.add_parser("explain", help="print the operations that build a task's sandbox")
    )
    explain.add_argument("task", metavar="TASK")
    return top


def main(argv: Sequence[str] | None = None) -> NoReturn:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    color = _use_color(sys.stderr)
    try:
        code = _dispatch(list(sys.argv[1:] if argv is None else argv))
    except HitzError as exc:
        sys.stderr.write(render_error(exc, color))
        code = exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(render_error(Interrupted("interrupted"), color))
        code = 130
    except BrokenPipeError:
        code = 1
    except Exception:
        traceback.print_exc()
        sys.stderr.write(
            "\nerror: this is a bug in hitz; please report it with the traceback above\n"
        )
        code = 70
    sys.exit(code)


def _image_parser(sub: argparse._SubParsersAction[_Parser],
                  with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
                  ) -> None:
    """`hitz image build | ls | rm` (docs/images.md)."""
    image = sub.add_parser("image", help="build, list and remove the images of images/",
                           description="Build the root filesystems of images/NAME.toml from"
                           " Debian packages, pinned by digest in hitz.lock next to the"
                           " manifest.")
    image_sub = image.add_subparsers(dest="image_command", metavar="SUBCOMMAND",
                                     parser_class=_Parser, required=True)
    build = with_config(image_sub.add_parser(
        "build", help="build an image (from its pinned packages when hitz.lock has it)"))
    build.add_argument("name", metavar="NAME", help="an image of images/ (images/NAME.toml)")
    build.add_argument("--update", action="store_true",
                       help="resolve the packages afresh and re-pin the image in hitz.lock")
    ls = with_config(image_sub.add_parser("ls", help="the images, their pins and builds"))
    ls.add_argument("--json", action="store_true", help="write the list as JSON to stdout")
    rm = with_config(image_sub.add_parser(
        "rm", help="remove an image's builds from the cache (its pin stays in hitz.lock)"))
    rm.add_argument("name", metavar="NAME")


def _image(manifest: Manifest, args: argparse.Namespace) -> int:
    from hitz.executor.images import build_image, list_images, remove_image
    from hitz.executor.runner import cache_folder

    cache_root = cache_folder(manifest)
    if args.image_command == "build":
        def say(text: str) -> None:
            sys.stderr.write(f"hitz: {text}\n")

        built = build_image(args.name, manifest.root, cache_root, update=args.update,
                            progress=say)
        print(f"{built.name} {built.digest}")
        return 0
    if args.image_command == "rm":
        for what in remove_image(args.name, manifest.root, cache_root):
            print(f"removed {args.name} {what}")
        return 0
    rows = list_images(manifest.root, cache_root)
    if args.json:
        import json

        print(json.dumps([row.as_json() for row in rows], indent=2))
        return 0
    print(f"{'NAME':<16} {'PINNED':<19} {'BUILT':<19} {'SIZE':>9}  PACKAGES")
    for row in rows:
        shown = ("(as pinned)" if row.built and row.built == row.pinned
                 else (row.built or "-")[:19])
        size = f"{row.size / 2**20:.1f}MiB" if row.size is not None else "-"
        name = row.name if row.defined else f"{row.name} (no definition)"
        print(f"{name:<16} {(row.pinned or '-')[:19]:<19} {shown:<19} {size:>9}"
              f"  {row.packages if row.packages is not None else '-'}")
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _use_color(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def render_error(exc: HitzError, color: bool = False) -> str:
    label = "\x1b[1;31merror\x1b[0m" if color else "error"
    out = f"{label}: {exc.message}\n"
    if exc.detail:
        out += exc.detail.rstrip("\n") + "\n"
    if exc.hint:
        hint = "\x1b[1;36mhint\x1b[0m" if color else "hint"
        out += f"\n{hint}: {exc.hint}\n"
    return out


def _dispatch(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help(sys.stderr)
        return 2
    if args.command == "doctor":
        return _doctor(args.json)
    if args.command == "schema":
        import json

        from hitz.executor.manifest import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.command == "worker":
        return _worker(args)
    if args.command == "cache" and args.cache_command == "serve":
        from hitz.executor.server import serve

        return serve(args.listen, args.cache_dir)
    manifest = _load(args.config)
    if args.command == "run":
        return _run(manifest, args)
    if args.command == "explain":
        return _explain(manifest, args.task)
    if args.command == "cache":
        return _cache(manifest, args)
    if args.command == "image":
        return _image(manifest, args)
    if args.command == "validate":
        return _validate(manifest)
    if args.command == "plan":
        return _plan(manifest, args.targets)
    if args.command == "graph":
        from hitz.executor import planner

        the_plan = planner.plan(manifest, args.targets)
        out = planner.to_dot(the_plan) if args.format == "dot" else planner.to_mermaid(the_plan)
        sys.stdout.write(out if out.endswith("\n") else out + "\n")
        return 0
    return _sandbox_explain(manifest, args.task)


def _worker(args: argparse.Namespace) -> int:
    from hitz.executor.remote_config import parse_url
    from hitz.executor.worker import run_worker

    try:
        parse_url(args.server)
    except ValueError:
        raise UsageError(f"--server: {args.server!r} is not a server address such as "
                         '"grpc://127.0.0.1:50051" or "grpcs://build.example.com:443"',
                         hint="for example `hitz worker --server grpc://127.0.0.1:50051`"
                         ) from None
    if args.jobs < 1:
        raise UsageError(f"-j must be at least 1, got {args.jobs}", hint="for example `-j 2`")

    def log(text: str) -> None:
        sys.stderr.write(text + "\n")

    return run_worker(args.server, args.instance, jobs=args.jobs, work_dir=args.work_dir,
                      log=log)


def _load(config: str) -> Manifest:
    from pathlib import Path

    from hitz.executor.inputs import STATE_DIR
    from hitz.executor.manifest import load

    return load(config, cache_dir=Path(os.path.abspath(config)).parent / STATE_DIR)


def _validate(manifest: Manifest) -> int:
    from hitz.executor import planner
    from hitz.executor.runner import Runner, state_dir_for

    the_plan = planner.plan(manifest)
    Runner(manifest, state_dir_for(manifest)).preflight(list(the_plan.tasks.values()))
    print(f"{manifest.display_path}: {len(manifest.tasks)} tasks, no problems found")
    return 0


def _plan(manifest: Manifest, targets: list[str]) -> int:
    from hitz.executor import planner
    from hitz.executor.history import History
    from hitz.executor.runner import state_dir_for

    history = History.load(state_dir_for(manifest))
    the_plan = planner.plan(manifest, targets, history.durations)
    ranked = sorted(the_plan.order, key=lambda n: (-the_plan.priority[n], the_plan.order.index(n)))
    width = max((len(n) for n in ranked), default=4) + 1
    print(f"{'task':<{width}}  priority  needs")
    for name in ranked:
        deps = ", ".join(":" + d for d in the_plan.tasks[name].deps) or "-"
        print(f":{name:<{width - 1}}  {the_plan.priority[name]:>8.2f}  {deps}")
    return 0


def _run(manifest: Manifest, args: argparse.Namespace) -> int:
    from hitz.executor import planner
    from hitz.executor.history import History
    from hitz.executor.progress import JsonSummary, LiveProgress, PlainProgress
    from hitz.executor.runner import Runner, open_store, project_lock, state_dir_for
    from hitz.executor.scheduler import DEFAULT_JOBS, Scheduler

    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"-j must be at least 1, got {args.jobs}", hint="for example `-j 4`")
    state_dir = state_dir_for(manifest)
    history = History.load(state_dir)
    the_plan = planner.plan(manifest, args.targets, history.durations)
    observers: list[RunObserver] = []
    if sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
        observers.append(LiveProgress(sys.stderr, _use_color(sys.stderr)))
    else:
        observers.append(PlainProgress(sys.stderr))
    if args.json:
        observers.append(JsonSummary(sys.stdout))

    def warn(text: str) -> None:
        sys.stderr.write(f"warning: {text}\n")

    def explain(name: str, reasons: list[str]) -> None:
        sys.stderr.write(f"explain: :{name}: {'; '.join(reasons) or 'no reason recorded'}\n")

    with project_lock(state_dir):
        # The store is opened, and the sandbox backend loaded, only once a
        # task is not up to date: a no-op run needs neither.
        runner = Runner(manifest, state_dir,
                        None if args.no_cache else lambda: open_store(manifest, warn),
                        warn=warn, explain=explain if args.explain else None,
                        remote=None if args.no_cache else _remote_tier(manifest, args, warn))
        runner.preflight([the_plan.tasks[name] for name in the_plan.order])
        # Refuse what cannot run here (no Landlock, no Docker engine) before
        # spending time on images.
        _check_policies(the_plan.tasks.values(), manifest)
        runner.prepare_images([the_plan.tasks[name] for name in the_plan.order])
        from hitz.executor.backends import Router

        # Each backend is loaded when a task first needs it: a run whose
        # tasks are all up to date imports none of them.
        backend = Router()
        remote = _remote_backend(manifest, args, list(the_plan.tasks.values()), runner)
        if remote is not None:
            backend.register("remote", remote)
        interrupted = True  # until the scheduler returns: uploads are then dropped
        try:
            summary = Scheduler(
                the_plan,
                backend,
                prepare=runner.prepare,
                finish=runner.finish,
                observers=observers,
                jobs=args.jobs or DEFAULT_JOBS,
                keep_going=args.keep_going,
                project=manifest.project,
            ).run()
            interrupted = summary.interrupted
        finally:
            backend.close()
            runner.cleanup(interrupted=interrupted)  # closes the store if it was opened
    history.record_run(summary)
    history.save()
    if summary.interrupted:
        return 130
    return 0 if summary.ok else 1


def _remote_tier(manifest: Manifest, args: argparse.Namespace,
                 warn: Callable[[str], None]) -> RemoteTier | None:
    """The remote cache of this run (docs/remote-cache.md), or None. Nothing
    is imported or connected here: only when a task first misses locally."""
    from dataclasses import replace

    from hitz.executor.remote_config import parse_url, resolve

    if args.remote:
        try:
            parse_url(args.remote)
        except ValueError as exc:
            raise UsageError(f"--remote: {exc}",
                             hint="for example `hitz run --remote grpc://127.0.0.1:8980`"
                             ) from None
    settings = resolve(manifest.cache_remote, flag=args.remote, no_remote=args.no_remote)
    if settings.url is None:
        return None
    if not args.remote:
        try:
            settings = replace(settings, url=parse_url(settings.url).url)
        except ValueError as exc:  # $HITZ_REMOTE_CACHE (the manifest's was checked)
            raise UsageError(f"$HITZ_REMOTE_CACHE: {exc}") from None
    from hitz.executor.remote_tier import RemoteTier

    return RemoteTier(settings, manifest.root, warn)


def _remote_backend(manifest: Manifest, args: argparse.Namespace, tasks: list[TaskDef],
                    runner: Runner) -> Callable[[], SandboxBackend] | None:
    """What builds the backend of tasks with backend = "remote"
    (docs/remote-execution.md), or None when the run has none. Refuses, before
    anything runs, a remote task with no executor set (exit status 2)."""
    if not any(task.backend == "remote" for task in tasks):
        return None
    from hitz.executor.remote_config import parse_url
    from hitz.executor.remote_exec import ENV_VAR, check_configured, settings_for

    settings = settings_for(manifest, args.remote_executor)
    if settings is not None and settings.url != manifest.remote_executor:
        where = "--remote-executor" if args.remote_executor else f"${ENV_VAR}"
        try:
            parse_url(settings.url)
        except ValueError:
            raise UsageError(f"{where}: {settings.url!r} is not an executor address such as "
                             '"grpc://127.0.0.1:8980" or "grpcs://build.example.com:443"',
                             hint="for example `hitz run --remote-executor "
                             "grpc://127.0.0.1:8980`") from None
    check_configured(manifest, tasks, settings)
    assert settings is not None

    def build() -> SandboxBackend:
        from hitz.executor.remote_exec import RemoteBackend

        return RemoteBackend(settings, runner.keys.get)

    return build


def _sandbox_explain(manifest: Manifest, task_name: str) -> int:
    from hitz.executor import planner
    from hitz.executor.runner import Runner, state_dir_for
    from hitz.sandbox.namespace.ops import describe
    from hitz.sandbox.namespace.plan import build_ops, layout_for

    the_plan = planner.plan(manifest, [task_name])
    name = task_name.lstrip(":")
    task = the_plan.tasks[name]
    runner = Runner(manifest, state_dir_for(manifest))
    runner.preflight([task])
    from hitz.executor.actions import policy_of
    from hitz.sandbox.spec import BASE_ENV, InputMount, Network, SandboxSpec

    mounts = [InputMount(str(manifest.root / rel), rel) for rel in runner.expanded[name]]
    for dep in task.deps:
        for out in manifest.tasks[dep].outputs:
            mounts.append(
                InputMount(str(manifest.root / out.rstrip("/")), out.rstrip("/"), out.endswith("/"))
            )
    spec = SandboxSpec(
        task=name,
        argv=task.argv,
        env={**BASE_ENV, **task.env},
        inputs=tuple(mounts),
        outputs=task.outputs,
        staging_dir="<staging>",
        stdout_path="<log>",
        stderr_path="<log>",
        network=Network(task.network),
        timeout=task.timeout_s,
        policy=policy_of(task),
        rootfs=task.rootfs,
        # The namespace sandbox's view of the image (built if it is not yet).
        image=None if task.rootfs == "host" else runner._image(task),
    )
    print(f"# sandbox of :{name}  (argv: {list(task.argv)})")
    for op in build_ops(spec, layout_for(spec)):
        print(describe(op))
    return 0


def _explain(manifest: Manifest, task_name: str) -> int:
    from hitz.executor import planner
    from hitz.executor.cache import cacheable, uncacheable_reason
    from hitz.executor.runner import Runner, open_store, state_dir_for

    name = task_name.lstrip(":")
    task = planner.plan(manifest, [name]).tasks[name]
    def warn(text: str) -> None:
        sys.stderr.write(f"warning: {text}\n")

    store = open_store(manifest, warn)
    try:
        runner = Runner(manifest, state_dir_for(manifest), store)
        runner.preflight([task])
        key, _ = runner.key_for(task)
        print(f":{name}: action {key.digest}")
        if cacheable(task) and store is not None and store.get_action_result(key.digest):
            print(f":{name}: in the cache; `hitz run` restores its outputs without running it")
            return 0
        refused = uncacheable_reason(task)
        reasons = [refused] if refused else runner.cache.explain(name, key)
        for reason in reasons:
            print(f":{name}: runs: {reason}")
        return 0
    finally:
        if store is not None:
            store.close(record_run=False)


def _cache(manifest: Manifest, args: argparse.Namespace) -> int:
    from hitz.executor.manifest import parse_size
    from hitz.executor.runner import DEFAULT_CACHE_BYTES, open_store

    store = open_store(manifest, None)
    if store is None:
        return 1
    try:
        if args.cache_command == "stats":
            stats = store.stats()
            last = stats.last_run
            lookups = last.ac_hits + last.ac_misses
            rate = f"{100 * last.ac_hits / lookups:.0f}%" if lookups else "-"
            print(f"cache: {store.folder}")
            print(f"entries: {stats.entries}")
            print(f"size: {stats.bytes} bytes")
            print(f"last run: {last.ac_hits} hits, {last.ac_misses} misses (hit rate {rate})")
            return 0
        target = store.max_bytes or DEFAULT_CACHE_BYTES
        if args.max_size:
            try:
                target = parse_size(args.max_size)
            except ValueError:
                raise UsageError(
                    f"--max-size must be a size such as 1GiB or 500MB, got {args.max_size!r}",
                    hint="for example `hitz cache gc --max-size 2GiB`",
                ) from None
        result = store.gc(target)
        print(f"evicted {result.evicted} entries ({result.evicted_bytes} bytes); "
              f"{result.entries} entries, {result.bytes} bytes left")
        return 0
    finally:
        store.close(record_run=False)


def _doctor(as_json: bool) -> int:
    """Exit 0 when the namespace backend can run here, 1 when it cannot."""
    import json
    from dataclasses import asdict

    from hitz.sandbox.probe import all_checks

    checks = all_checks()
    if as_json:
        print(json.dumps([asdict(check) for check in checks], indent=2))
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            mark = "ok" if check.ok else ("MISSING" if check.required else "no")
            print(f"{mark:<8}{check.name:<{width + 2}}{check.detail}")
            if not check.ok and check.hint:
                print(f"{'':<{width + 10}}hint: {check.hint}")
    return 0 if all(check.ok for check in checks if check.required) else 1


def _check_policies(tasks: Iterable[TaskDef], manifest: Manifest) -> None:
    """Fail closed before anything runs: every task's policy must be
    enforceable here (STYLE 10); tasks of the docker backend need a
    reachable engine that has their images (exit status 2 otherwise)."""
    from hitz.executor.actions import policy_of

    docker_tasks = []
    checked: set[tuple[str, Policy]] = set()  # thousands of tasks share a few policies
    for task in tasks:
        if task.backend not in ("docker", "namespace"):
            continue
        policy = policy_of(task)
        if (task.backend, policy) not in checked:
            if task.backend == "docker":
                from hitz.sandbox.docker import check_policy as check_docker_policy

                check_docker_policy(task.name, policy)
            else:
                from hitz.sandbox.hostcheck import check_namespace_policy

                check_namespace_policy(task.name, policy)
            checked.add((task.backend, policy))
        if task.backend == "docker":
            docker_tasks.append(task)
    if docker_tasks:
        _check_docker(docker_tasks, manifest)


def _check_docker(tasks: list[TaskDef], manifest: Manifest) -> None:
    """The engine answers, and has every ``docker:`` image the tasks name
    (``image:`` ones are built, and imported, by the image builder). An
    unreachable engine's error says which task needs it, and where."""
    from hitz.sandbox.docker import DockerUnavailable, check_engine

    refs: dict[str, str] = {}
    for task in tasks:
        if task.rootfs.startswith("docker:"):
            refs.setdefault(task.rootfs.removeprefix("docker:"), task.name)
    try:
        check_engine(refs)
    except DockerUnavailable as exc:
        if exc.detail is None:
            first = tasks[0]
            more = f" and {len(tasks) - 1} more" if len(tasks) > 1 else ""
            exc.detail = (f'needed by task "{first.name}"'
                          f" ({manifest.where('tasks', first.name, 'backend')}){more}")
        raise
