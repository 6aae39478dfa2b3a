"""The planner: selection, order, critical-path priority, cycles, graph output.

History (the durations the planner weighs tasks with) is tested here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hitz.executor.errors import PlanError, PlanErrorReason
from hitz.executor.events import Outcome, RunSummary, TaskResult
from hitz.executor.history import History
from hitz.executor.model import Manifest, TaskDef
from hitz.executor.planner import (
    find_cycle,
    plan,
    task_weight,
    to_dot,
    to_mermaid,
    toposort,
)


def task(name: str, *deps: str, line: int = 0, argv: tuple[str, ...] = ("true",)) -> TaskDef:
    return TaskDef(name=name, argv=argv, deps=deps, line=line)


def manifest(*tasks: TaskDef) -> Manifest:
    return Manifest(
        path=Path("/project/hitz.toml"),
        display_path="hitz.toml",
        root=Path("/project"),
        project="project",
        tasks={t.name: t for t in tasks},
        locations={("tasks", t.name): t.line for t in tasks if t.line},
    )


# A small build: two independent chains and a task that needs both.
BUILD = manifest(
    task("lint", line=1),
    task("gen", line=4),
    task("compile", "gen", line=7),
    task("link", "compile", line=10),
    task("test", "link", "lint", line=13),
    task("docs", line=16),
)


# Selection


def test_no_targets_selects_every_task_in_declaration_order() -> None:
    assert list(plan(BUILD).tasks) == ["lint", "gen", "compile", "link", "test", "docs"]


def test_a_target_brings_everything_it_needs_and_nothing_else() -> None:
    assert list(plan(BUILD, [":link"]).tasks) == ["gen", "compile", "link"]


def test_targets_may_be_written_with_or_without_colon() -> None:
    assert plan(BUILD, ["link"]).tasks == plan(BUILD, [":link"]).tasks
    assert list(plan(BUILD, ["docs", ":lint", "docs"]).tasks) == ["lint", "docs"]


def test_unknown_target_suggests_the_nearest_task() -> None:
    with pytest.raises(PlanError) as caught:
        plan(BUILD, [":tset"])
    assert caught.value.message == 'unknown task ":tset"'
    assert caught.value.hint == 'did you mean ":test"?'
    assert caught.value.reason is PlanErrorReason.UNKNOWN_TARGET


def test_unknown_target_without_a_near_name_has_no_hint() -> None:
    with pytest.raises(PlanError) as caught:
        plan(BUILD, ["zzzzzz"])
    assert caught.value.message == 'unknown task ":zzzzzz"'
    assert caught.value.hint is None


def test_dep_on_an_undeclared_task_is_a_plan_error() -> None:
    with pytest.raises(PlanError) as caught:
        plan(manifest(task("test", "bild", line=3), task("build", line=1)), [":test"])
    assert caught.value.message == 'task ":test" needs unknown task ":bild"'
    assert caught.value.detail == "declared at hitz.toml:3"
    assert caught.value.hint == 'did you mean ":build"?'


def test_an_undeclared_dep_is_caught_without_targets_too() -> None:
    with pytest.raises(PlanError, match=r'^task ":test" needs unknown task ":bild"$'):
        plan(manifest(task("test", "bild", line=3), task("build", line=1)))


# Order


def test_order_puts_dependencies_first_then_declaration_order() -> None:
    assert plan(BUILD).order == ["lint", "gen", "docs", "compile", "link", "test"]


def test_toposort_ignores_names_outside_the_mapping() -> None:
    assert toposort({"b": ["a", "outside"], "a": []}) == ["a", "b"]


def test_toposort_refuses_a_cycle() -> None:
    with pytest.raises(ValueError, match="a, b"):
        toposort({"a": ["b"], "b": ["a"], "c": []})


def test_dependents_lists_who_needs_each_task() -> None:
    dependents = plan(BUILD).dependents
    assert dependents["gen"] == ["compile"]
    assert dependents["lint"] == ["test"]
    assert dependents["test"] == []


def test_a_long_chain_plans_without_recursion() -> None:
    chain = manifest(task("t0"), *(task(f"t{i}", f"t{i - 1}") for i in range(1, 10_000)))
    planned = plan(chain)
    assert planned.order[0] == "t0"
    assert planned.order[-1] == "t9999"
    assert planned.priority["t0"] == 10_000.0
    assert find_cycle(chain) is None


def test_a_long_cycle_is_found_without_recursion() -> None:
    ring = manifest(task("t0", "t9999"), *(task(f"t{i}", f"t{i - 1}") for i in range(1, 10_000)))
    cycle = find_cycle(ring)
    assert cycle is not None
    assert (len(cycle), cycle[0], cycle[1], cycle[-1]) == (10_001, "t0", "t9999", "t0")


# Priority


def test_priority_is_the_longest_chain_of_work_waiting_on_a_task() -> None:
    assert plan(BUILD).priority == {
        "gen": 4.0,
        "compile": 3.0,
        "link": 2.0,
        "lint": 2.0,
        "test": 1.0,
        "docs": 1.0,
    }


def test_priority_uses_recorded_durations() -> None:
    history = {"gen": 0.5, "compile": 2.0, "lint": 10.0, "test": 1.5}
    assert plan(BUILD, history=history).priority == {
        "gen": 0.5 + 2.0 + 1.0 + 1.5,
        "compile": 2.0 + 1.0 + 1.5,
        "link": 1.0 + 1.5,
        "lint": 10.0 + 1.5,
        "test": 1.5,
        "docs": 1.0,
    }


def test_a_pure_grouping_weighs_nothing() -> None:
    grouping = task("all", "a", argv=())
    assert task_weight(grouping, {"all": 5.0}) == 0.0
    assert task_weight(task("a"), {}) == 1.0
    assert task_weight(task("a"), {"a": 0.25}) == 0.25
    assert plan(manifest(task("a"), grouping)).priority == {"a": 1.0, "all": 0.0}


# Cycles


CYCLIC = manifest(
    task("fmt", line=1),
    task("gen", "lint", line=3),
    task("lint", "fmt", "gen", line=7),
    task("test", "gen", line=11),
)


def test_cycle_is_reported_as_a_path_with_manifest_lines() -> None:
    with pytest.raises(PlanError) as caught:
        plan(CYCLIC)
    error = caught.value
    assert error.reason is PlanErrorReason.CYCLE
    assert error.message == "dependency cycle: :gen -> :lint -> :gen"
    assert error.detail == ":gen (hitz.toml:3) needs :lint\n:lint (hitz.toml:7) needs :gen"
    assert error.hint == 'remove one of these dependencies (a `deps` entry or a ":task" input)'


def test_cycle_starts_from_the_target_the_user_named() -> None:
    with pytest.raises(PlanError) as caught:
        plan(CYCLIC, [":lint"])
    assert caught.value.message == "dependency cycle: :lint -> :gen -> :lint"


def test_cycle_outside_the_selected_targets_is_still_an_error() -> None:
    with pytest.raises(PlanError, match=r"^dependency cycle: :gen -> :lint -> :gen$"):
        plan(CYCLIC, [":fmt"])


def test_a_task_that_needs_itself_is_a_cycle() -> None:
    assert find_cycle(manifest(task("a"), task("b", "b"))) == ["b", "b"]


def test_find_cycle_returns_none_for_a_dag() -> None:
    assert find_cycle(BUILD) is None


def test_find_cycle_follows_the_path_into_a_longer_cycle() -> None:
    ring = manifest(task("entry", "a"), task("a", "b"), task("b", "c"), task("c", "a"))
    assert find_cycle(ring) == ["a", "b", "c", "a"]
    assert find_cycle(ring, start=["c"]) == ["c", "a", "b", "c"]


# Graph output


def test_to_dot() -> None:
    assert to_dot(plan(BUILD, [":link"])) == (
        "digraph hitz {\n"
        "  // an arrow points from a task to a task it needs\n"
        "  node [shape=box];\n"
        '  "gen" [label=":gen"];\n'
        '  "compile" [label=":compile"];\n'
        '  "link" [label=":link"];\n'
        '  "compile" -> "gen";\n'
        '  "link" -> "compile";\n'
        "}\n"
    )


def test_to_mermaid() -> None:
    assert to_mermaid(plan(BUILD, [":link"])) == (
        "flowchart TD\n"
        "  %% an arrow points from a task to a task it needs\n"
        '  t0[":gen"]\n'
        '  t1[":compile"]\n'
        '  t2[":link"]\n'
        "  t1 --> t0\n"
        "  t2 --> t1\n"
    )


# History


def result(name: str, outcome: Outcome, seconds: float) -> TaskResult:
    return TaskResult(name=name, outcome=outcome, status=outcome.value, duration_s=seconds)


def test_history_round_trips_and_records_only_successes(tmp_path: Path) -> None:
    state = tmp_path / ".hitz"
    history = History.load(state)
    assert history.durations == {}
    history.record_run(
        RunSummary(
            project="p",
            results=[
                result("compile", Outcome.SUCCEEDED, 0.42),
                result("link", Outcome.FAILED, 0.1),
                result("test", Outcome.CANCELLED, 0.0),
            ],
            duration_s=1.0,
        )
    )
    assert history.save() is True
    assert History.load(state).durations == {"compile": 0.42}
    assert [p.name for p in state.iterdir()] == ["history.json"]  # no temp file left


def test_history_keeps_the_last_duration_of_a_task(tmp_path: Path) -> None:
    history = History.load(tmp_path)
    history.record("compile", 3.0)
    history.record("compile", 2.0)
    history.save()
    assert History.load(tmp_path).durations == {"compile": 2.0}


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"durations": [1]}',
    ],
)
def test_corrupt_history_reads_as_empty(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "history.json").write_bytes(content)
    assert History.load(tmp_path).durations == {}


def test_history_drops_entries_that_are_not_durations(tmp_path: Path) -> None:
    document = {"durations": {"a": 1.5, "b": "slow", "c": -1, "d": True, "e": 2}}
    (tmp_path / "history.json").write_text(json.dumps(document))
    assert History.load(tmp_path).durations == {"a": 1.5, "e": 2.0}


def test_history_that_cannot_be_written_is_not_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    history = History.load(blocker / ".hitz")  # its parent is a file
    history.record("a", 1.0)
    assert history.save() is False
