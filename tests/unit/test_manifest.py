"""The manifest loader: what a good hitz.toml becomes, and what each bad one says.

The exact text of every message is asserted on purpose (STYLE 3): a change of
wording should show up in review.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hitz.executor.errors import ManifestError, ManifestErrorReason
from hitz.executor.manifest import DURATION_PATTERN, json_schema, load, parse_duration, suggest
from hitz.executor.model import Manifest
from hitz.executor.toml_lines import scan
from hitz.sandbox.spec import Network

R = ManifestErrorReason


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project folder, made the working directory."""
    folder = tmp_path / "demo"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def load_text(text: str) -> Manifest:
    Path("hitz.toml").write_text(textwrap.dedent(text))
    return load("hitz.toml")


def error(text: str) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_text(text)
    return info.value


# --- good manifests ------------------------------------------------------------


FULL = """\
[project]
name = "demo"

[defaults]
timeout = "5m"
env = { LANG = "C.UTF-8", CC = "cc" }

[tasks.codegen]
run = ["python3", "gen.py"]
outputs = ["build/gen/"]

[tasks.compile]
description = "compile main"
run = "cc -c src/main.c -o build/main.o"
inputs = ["src/*.c", "include/**/*.h", ":codegen", "data/"]
outputs = ["./build//main.o"]
deps = ["lint", ":codegen"]
env = { CC = "clang", CFLAGS = "-O2" }
timeout = "90s"
network = "host"

[tasks.lint]
run = "true"
"""


def test_full_manifest(project: Path) -> None:
    manifest = load_text(FULL)
    assert manifest.path == project / "hitz.toml"
    assert manifest.display_path == "hitz.toml"
    assert manifest.root == project
    assert manifest.project == "demo"
    assert list(manifest.tasks) == ["codegen", "compile", "lint"]
    compile_ = manifest.tasks["compile"]
    assert compile_.argv == ("/bin/sh", "-c", "cc -c src/main.c -o build/main.o")
    assert compile_.shell is True
    assert compile_.inputs == ("src/*.c", "include/**/*.h", ":codegen", "data/")
    assert compile_.outputs == ("build/main.o",)
    assert compile_.deps == ("lint", "codegen")
    assert compile_.env == {"LANG": "C.UTF-8", "CC": "clang", "CFLAGS": "-O2"}
    assert compile_.timeout_s == 90.0
    assert compile_.network == "host"
    assert compile_.description == "compile main"
    assert compile_.line == 12
    codegen = manifest.tasks["codegen"]
    assert codegen.argv == ("python3", "gen.py")
    assert codegen.shell is False
    assert codegen.outputs == ("build/gen/",)
    assert codegen.env == {"LANG": "C.UTF-8", "CC": "cc"}
    assert codegen.timeout_s == 300.0
    assert codegen.network == "none"
    assert codegen.line == 8
    assert manifest.lines[0] == "[project]"


def test_builtin_defaults_and_folder_name(project: Path) -> None:
    manifest = load_text('[tasks.a]\nrun = "true"\n')
    assert manifest.project == "demo"
    task = manifest.tasks["a"]
    assert (task.backend, task.rootfs, task.network, task.timeout_s) == (
        "namespace",
        "host",
        "none",
        600.0,
    )
    assert task.env == {}
    assert task.inputs == task.outputs == task.deps == ()
    assert task.description is None


def test_dotted_keys_and_inline_tables_mean_the_same(project: Path) -> None:
    tables = load_text(
        """\
        [tasks.a]
        run = "true"
        env = { X = "1" }
        [tasks.b]
        run = "true"
        deps = ["a"]
        """
    )
    dotted = load_text(
        """\
        [tasks]
        a.run = "true"
        a.env.X = "1"
        b = { run = "true", deps = ["a"] }
        """
    )
    assert tables.tasks["a"].env == dotted.tasks["a"].env == {"X": "1"}
    assert tables.tasks["b"].deps == dotted.tasks["b"].deps == ("a",)
    assert [t.line for t in dotted.tasks.values()] == [2, 4]


def test_the_example_manifest_loads() -> None:
    example = Path(__file__).parents[2] / "hitz.toml.example"
    manifest = load(example)
    assert manifest.tasks["link"].deps == ("compile_main", "archive")
    assert manifest.display_path == str(example)


def test_network_values_match_the_sandbox() -> None:
    schema = json_schema()["$defs"]["Defaults"]["properties"]["network"]
    assert schema["enum"] == [n.value for n in Network]


# --- locations -----------------------------------------------------------------


def test_locations_follow_multiline_arrays_dotted_keys_and_inline_tables(project: Path) -> None:
    manifest = load_text(
        """\
[defaults]
timeout = "1m"  # a comment with [brackets] = "and quotes"

[tasks.build]
run = '''
[tasks.fake]
echo "]"
'''
inputs = [
  "src/*.c",   # first
  # a comment line
  ":gen",
  "data/",
]
env.CC = "gcc"
[tasks.gen]
run = ["a", "b # not a comment"]
outputs = [
  "build/gen/",
]
[tasks]
"v1.2" = { run = "true", env = { Y = "2" } }
"""
    )
    loc = manifest.locations
    assert loc[("defaults",)] == 1
    assert loc[("defaults", "timeout")] == 2
    assert loc[("tasks", "build")] == 4
    assert ("tasks", "fake") not in loc
    assert loc[("tasks", "build", "run")] == 5
    assert loc[("tasks", "build", "inputs")] == 9
    assert loc[("tasks", "build", "inputs", 0)] == 10
    assert loc[("tasks", "build", "inputs", 1)] == 12
    assert loc[("tasks", "build", "inputs", 2)] == 13
    assert loc[("tasks", "build", "env")] == 15
    assert loc[("tasks", "build", "env", "CC")] == 15
    assert loc[("tasks", "gen")] == 16
    assert loc[("tasks", "gen", "run", 1)] == 17
    assert loc[("tasks", "gen", "outputs", 0)] == 19
    assert loc[("tasks", "v1.2")] == 22
    assert loc[("tasks", "v1.2", "env", "Y")] == 22
    assert manifest.tasks["build"].line == 4
    assert manifest.tasks["v1.2"].line == 22
    assert manifest.line_of("tasks", "build", "inputs", 1) == 12
    assert manifest.where("tasks", "gen", "outputs", 0) == "hitz.toml:19"


def test_scan_columns() -> None:
    source = '[tasks . "a b"]\nx = [1, [2, 3], { k = "v" }]\n'
    positions = scan(source)
    assert positions.keys[("tasks", "a b")] == (1, 10)
    assert positions.keys[("tasks", "a b", "x")] == (2, 1)
    assert positions.values[("tasks", "a b", "x")] == (2, 5)
    assert positions.keys[("tasks", "a b", "x", 1, 1)] == (2, 13)
    assert positions.keys[("tasks", "a b", "x", 2, "k")] == (2, 19)
    assert positions.values[("tasks", "a b", "x", 2, "k")] == (2, 23)


def test_scan_arrays_of_tables_strings_and_escapes() -> None:
    source = "\n".join(
        [
            "[[jobs]]",
            'name = "one"',
            "[[jobs]]",
            'name = """two',
            '[not.a.table]""""',
            "[jobs.sub]",
            "\"k\\u0041\" = 'x'",
            "when = 1979-05-27 07:32:00Z",
            "after = 1",
        ]
    )
    assert tomllib.loads(source)["jobs"][1]["sub"]["kA"] == "x"
    positions = scan(source).lines()
    assert positions[("jobs",)] == 1
    assert positions[("jobs", 0)] == 1
    assert positions[("jobs", 1, "name")] == 4
    assert ("not",) not in positions
    assert positions[("jobs", 1, "sub")] == 6
    assert positions[("jobs", 1, "sub", "kA")] == 7
    assert positions[("jobs", 1, "sub", "after")] == 9


# A tiny TOML writer that knows which line it puts each key on: the scanner
# must find every key path tomllib sees, on that line.
_BARE = st.from_regex(r"[a-z][a-z0-9_-]{0,6}", fullmatch=True)
_KEY = st.one_of(_BARE, st.text("ab .#=[]\"'é", min_size=1, max_size=6))
_STRING = st.text("ab #,]}[{=\"'\\\n\té", max_size=8)
_SCALAR = st.one_of(_STRING, st.integers(-5, 5), st.booleans(), st.floats(-2, 2))
_VALUE = st.recursive(
    _SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(_KEY, inner, max_size=3),
    ),
    max_leaves=6,
)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


class _Writer:
    def __init__(self, multiline: bool) -> None:
        self.lines: list[str] = []
        self.expected: dict[tuple[str | int, ...], int] = {}
        self.multiline = multiline

    def inline(self, value: Any, path: tuple[str | int, ...], line: int) -> str:
        if isinstance(value, dict):
            parts = []
            for key, item in value.items():
                self.expected[(*path, key)] = line
                parts.append(f"{_toml_key(key)} = {self.inline(item, (*path, key), line)}")
            return "{ " + ", ".join(parts) + " }"
        if isinstance(value, list):
            for index in range(len(value)):
                self.expected[(*path, index)] = line
            return (
                "[" + ", ".join(self.inline(v, (*path, i), line) for i, v in enumerate(value)) + "]"
            )
        return _toml_scalar(value)

    def keyval(self, path: tuple[str | int, ...], key: str, value: Any) -> None:
        line = len(self.lines) + 1
        self.expected[(*path, key)] = line
        if isinstance(value, list) and value and self.multiline:
            self.lines.append(f"{_toml_key(key)} = [  # items follow")
            for index, item in enumerate(value):
                self.expected[(*path, key, index)] = len(self.lines) + 1
                text = self.inline(item, (*path, key, index), len(self.lines) + 1)
                self.lines.append(f"  {text},")
            self.lines.append("]")
        else:
            self.lines.append(f"{_toml_key(key)} = {self.inline(value, (*path, key), line)}")


@settings(max_examples=150, deadline=None)
@given(
    tables=st.dictionaries(_KEY, st.dictionaries(_KEY, _VALUE, max_size=4), max_size=4),
    multiline=st.booleans(),
)
def test_scan_finds_every_key_on_its_line(
    tables: dict[str, dict[str, Any]], multiline: bool
) -> None:
    writer = _Writer(multiline)
    for table, body in tables.items():
        writer.expected[(table,)] = len(writer.lines) + 1
        writer.lines.append(f"[{_toml_key(table)}]")
        for key, value in body.items():
            writer.keyval((table,), key, value)
    text = "\n".join(writer.lines) + "\n"
    assert tomllib.loads(text) == tables
    assert scan(text).lines() == writer.expected


@settings(max_examples=300, deadline=None)
@given(st.text("[]{}=\"',.\n #:ab1\\'t", max_size=40))
def test_any_text_gives_a_manifest_or_a_manifest_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "hitz.toml")
        path.write_text(text)
        with contextlib.suppress(ManifestError):
            load(path)
    scan(text)  # never raises, whatever the text


# --- errors: exact messages ----------------------------------------------------

CASES = [
    pytest.param(
        '[tasks.a]\nrun = "x"\nrun = "y"\n',
        "hitz.toml:3: TOML syntax error: this key already has a value",
        None,
        R.TOML_SYNTAX,
        id="toml-duplicate-key",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\n[tasks.a]\n',
        "hitz.toml:3: TOML syntax error: table [tasks.a] is declared twice",
        None,
        R.TOML_SYNTAX,
        id="toml-duplicate-table",
    ),
    pytest.param(
        "[tasks.a]\nrun = x\n",
        "hitz.toml:2: TOML syntax error: invalid value",
        None,
        R.TOML_SYNTAX,
        id="toml-invalid-value",
    ),
    pytest.param(
        '[tasks.a]\nrun = ["x" "y"]\n',
        "hitz.toml:2: TOML syntax error: unclosed array",
        None,
        R.TOML_SYNTAX,
        id="toml-unclosed",
    ),
    pytest.param(
        '[task.build]\nrun = "x"\n',
        'hitz.toml:1: unknown key "task"',
        'did you mean "tasks"?',
        R.UNKNOWN_KEY,
        id="unknown-top-level-key",
    ),
    pytest.param(
        '[project]\nnmae = "x"\n[tasks.a]\nrun = "x"\n',
        'hitz.toml:2: [project]: unknown key "nmae"',
        'did you mean "name"?',
        R.UNKNOWN_KEY,
        id="unknown-project-key",
    ),
    pytest.param(
        '[defaults]\nnetwrok = "none"\n[tasks.a]\nrun = "x"\n',
        'hitz.toml:2: [defaults]: unknown key "netwrok"',
        'did you mean "network"?',
        R.UNKNOWN_KEY,
        id="unknown-defaults-key",
    ),
    pytest.param(
        '[tasks.test]\nrun = "x"\ntimout = "5m"\n',
        'hitz.toml:3: task "test": unknown key "timout"',
        'did you mean "timeout"?',
        R.UNKNOWN_KEY,
        id="unknown-task-key",
    ),
    pytest.param(
        '[tasks.test]\nrun = "x"\nimage = "alpine"\n',
        'hitz.toml:3: task "test": unknown key "image"',
        'the known keys are "description", "run", "inputs", "outputs", "deps", "env",'
        ' "timeout", "network", "backend", "rootfs", "cache", "seccomp", "capabilities",'
        ' "limits", "landlock"',
        R.UNKNOWN_KEY,
        id="unknown-task-key-no-match",
    ),
    pytest.param(
        '[tasks.build]\nrun = "x"\ninputs = "src/*.c"\n',
        'hitz.toml:3: task "build": "inputs" must be a list of strings, got "src/*.c"',
        'write it as a list: `inputs = ["src/*.c"]`',
        R.WRONG_TYPE,
        id="inputs-not-a-list",
    ),
    pytest.param(
        '[tasks.build]\nrun = "x"\ninputs = [\n  "a",\n  3,\n]\n',
        'hitz.toml:5: task "build": "inputs" items must be strings, got 3',
        None,
        R.WRONG_TYPE,
        id="inputs-item-not-a-string",
    ),
    pytest.param(
        '[tasks.build]\nrun = "x"\nenv = { CFLAGS = 2 }\n',
        'hitz.toml:3: task "build": env "CFLAGS" must be a string, got 2',
        'quote it: `CFLAGS = "2"`',
        R.WRONG_TYPE,
        id="env-value-not-a-string",
    ),
    pytest.param(
        '[tasks.build]\nrun = "x"\nenv = "A=1"\n',
        'hitz.toml:3: task "build": "env" must be a table of strings, got "A=1"',
        'write it as a table, such as `env = { NAME = "value" }`',
        R.WRONG_TYPE,
        id="env-not-a-table",
    ),
    pytest.param(
        "[tasks.build]\nrun = 5\n",
        'hitz.toml:2: task "build": "run" must be a command string or a list of strings, got 5',
        None,
        R.WRONG_TYPE,
        id="run-wrong-type",
    ),
    pytest.param(
        '[tasks.build]\nrun = ["cc", true]\n',
        'hitz.toml:2: task "build": "run" items must be strings, got true',
        None,
        R.WRONG_TYPE,
        id="run-item-wrong-type",
    ),
    pytest.param(
        "[tasks]\nbuild = 3\n",
        'hitz.toml:2: task "build" must be a table, got 3',
        "declare it as `[tasks.build]` followed by `run = ...`",
        R.WRONG_TYPE,
        id="task-not-a-table",
    ),
    pytest.param(
        '[[tasks]]\nrun = "x"\n',
        'hitz.toml:1: "tasks" must be a table of tasks, got a list',
        "declare each task as `[tasks.NAME]`, not `[[tasks]]`",
        R.WRONG_TYPE,
        id="array-of-tasks",
    ),
    pytest.param(
        '[tasks.test]\nrun = "x"\ntimeout = 5\n',
        'hitz.toml:3: task "test": "timeout" must be a duration such as "90s" or "5m", got 5',
        'write it as a string with a unit, such as `timeout = "5s"` or `"5m"`',
        R.BAD_DURATION,
        id="timeout-number",
    ),
    pytest.param(
        '[tasks.test]\nrun = "x"\ntimeout = "5 minutes"\n',
        'hitz.toml:3: task "test": "timeout" must be a duration such as "90s" or "5m",'
        ' got "5 minutes"',
        None,
        R.BAD_DURATION,
        id="timeout-words",
    ),
    pytest.param(
        '[defaults]\ntimeout = "90"\n[tasks.a]\nrun = "x"\n',
        'hitz.toml:2: [defaults]: "timeout" must be a duration such as "90s" or "5m", got "90"',
        'add a unit, such as "90s" or "90m"',
        R.BAD_DURATION,
        id="timeout-no-unit",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\ntimeout = "0s"\n',
        'hitz.toml:3: task "a": "timeout" must be longer than zero, got "0s"',
        None,
        R.BAD_DURATION,
        id="timeout-zero",
    ),
    pytest.param(
        '[tasks.build]\ndescription = "no command"\n',
        'hitz.toml:1: task "build": missing key "run"',
        'add the command to run, such as `run = "make"`',
        R.MISSING_KEY,
        id="missing-run",
    ),
    pytest.param(
        "[tasks.build]\nrun = []\n",
        'hitz.toml:2: task "build": "run" is empty',
        'give a command, such as `run = "make"` or `run = ["make", "-j4"]`',
        R.BAD_VALUE,
        id="run-empty-list",
    ),
    pytest.param(
        '[tasks.build]\nrun = "  "\n',
        'hitz.toml:2: task "build": "run" is empty',
        'give a command, such as `run = "make"` or `run = ["make", "-j4"]`',
        R.BAD_VALUE,
        id="run-blank-string",
    ),
    pytest.param(
        '[tasks.build]\nrun = ["", "x"]\n',
        'hitz.toml:2: task "build": "run" must start with a program, got ""',
        None,
        R.BAD_VALUE,
        id="run-empty-program",
    ),
    pytest.param(
        '[tasks.build]\nrun = "x"\ndeps = ["tset"]\n[tasks.test]\nrun = "y"\n',
        'hitz.toml:3: task "build": unknown task ":tset"',
        'did you mean ":test"?',
        R.UNKNOWN_TASK,
        id="unknown-dep",
    ),
    pytest.param(
        '[tasks.build]\nrun = "x"\ninputs = ["src/a.c", ":tset"]\n[tasks.test]\nrun = "y"\n',
        'hitz.toml:3: task "build": unknown task ":tset"',
        'did you mean ":test"?',
        R.UNKNOWN_TASK,
        id="unknown-task-input",
    ),
    pytest.param(
        '[tasks.build]\nrun = "x"\ndeps = [":zzz"]\n',
        'hitz.toml:3: task "build": unknown task ":zzz"',
        None,
        R.UNKNOWN_TASK,
        id="unknown-dep-no-match",
    ),
    pytest.param(
        '[tasks.test]\nrun = "x"\ndeps = ["tset"]\n',
        'hitz.toml:3: task "test": unknown task ":tset"',
        None,
        R.UNKNOWN_TASK,
        id="no-suggesting-itself",
    ),
    pytest.param(
        '[tasks.build]\nrun = "x"\ndeps = [":build"]\n',
        'hitz.toml:3: task "build" depends on itself',
        'remove ":build" from `deps`',
        R.BAD_VALUE,
        id="self-dep",
    ),
    pytest.param(
        '[tasks.build]\nrun = "x"\ninputs = [":build"]\n',
        'hitz.toml:3: task "build" depends on itself',
        'remove ":build" from `inputs`',
        R.BAD_VALUE,
        id="self-input",
    ),
    pytest.param(
        '[tasks."my task"]\nrun = "x"\n',
        'hitz.toml:1: invalid task name "my task"',
        'task names use letters, digits, "_", "." and "-", and start with a letter, digit or "_"',
        R.BAD_TASK_NAME,
        id="bad-task-name",
    ),
    pytest.param(
        '[tasks.-x]\nrun = "x"\n',
        'hitz.toml:1: invalid task name "-x"',
        'task names use letters, digits, "_", "." and "-", and start with a letter, digit or "_"',
        R.BAD_TASK_NAME,
        id="bad-task-name-dash",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\noutputs = ["build/x.o"]\n\n'
        '[tasks.b]\nrun = "x"\noutputs = ["./build//x.o"]\n',
        'hitz.toml:7: task "b": output "build/x.o" is also declared by task "a" at hitz.toml:3',
        'one task writes each path; others read it with `inputs = [":a"]`',
        R.DUPLICATE_OUTPUT,
        id="duplicate-output",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\noutputs = ["build/gen/"]\n'
        '[tasks.b]\nrun = "x"\noutputs = [\n  "b.txt",\n  "build/gen/x.c",\n]\n',
        'hitz.toml:8: task "b": output "build/gen/x.c" is inside output "build/gen/"'
        ' of task "a" at hitz.toml:3',
        'one task writes each path; others read it with `inputs = [":a"]`',
        R.DUPLICATE_OUTPUT,
        id="output-inside-output-dir",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\noutputs = ["build/x.o"]\n'
        '[tasks.b]\nrun = "x"\noutputs = ["build/"]\n',
        'hitz.toml:6: task "b": output "build/" contains output "build/x.o" of task "a"'
        " at hitz.toml:3",
        'one task writes each path; others read it with `inputs = [":a"]`',
        R.DUPLICATE_OUTPUT,
        id="output-dir-contains-output",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\noutputs = ["build/x", "build/x/"]\n',
        'hitz.toml:3: task "a": output "build/x" is also declared by task "a" at hitz.toml:3',
        "declare each path once",
        R.DUPLICATE_OUTPUT,
        id="output-twice-in-one-task",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\noutputs = ["/etc/x"]\n',
        'hitz.toml:3: task "a": output "/etc/x" is outside the project',
        "paths are relative to the folder that holds `hitz.toml`",
        R.PATH_ESCAPES,
        id="absolute-output",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\ninputs = ["/usr/include/*.h"]\n',
        'hitz.toml:3: task "a": input "/usr/include/*.h" is outside the project',
        "paths are relative to the folder that holds `hitz.toml`",
        R.PATH_ESCAPES,
        id="absolute-input",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\ninputs = ["src/../../x"]\n',
        'hitz.toml:3: task "a": input "src/../../x" is outside the project',
        "paths are relative to the folder that holds `hitz.toml`",
        R.PATH_ESCAPES,
        id="dotdot-input",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\noutputs = ["../out"]\n',
        'hitz.toml:3: task "a": output "../out" is outside the project',
        "paths are relative to the folder that holds `hitz.toml`",
        R.PATH_ESCAPES,
        id="dotdot-output",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\noutputs = [".hitz/cache"]\n',
        'hitz.toml:3: task "a": output ".hitz/cache" is inside ".hitz/", hitz\'s state folder',
        '".hitz/" holds hitz\'s cache and logs; no task may read or write it',
        R.PATH_ESCAPES,
        id="state-dir-output",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\ninputs = ["x/../.hitz/"]\n',
        'hitz.toml:3: task "a": input "x/../.hitz/" is inside ".hitz/", hitz\'s state folder',
        '".hitz/" holds hitz\'s cache and logs; no task may read or write it',
        R.PATH_ESCAPES,
        id="state-dir-input",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\noutputs = ["./"]\n',
        'hitz.toml:3: task "a": output "./" is the whole project',
        'name what the task writes, such as "build/"',
        R.PATH_ESCAPES,
        id="output-dot",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\noutputs = [""]\n',
        'hitz.toml:3: task "a": empty output path',
        None,
        R.PATH_ESCAPES,
        id="output-empty",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\ninputs = ["."]\n',
        'hitz.toml:3: task "a": input "." is the whole project',
        'to depend on every file, use "**"',
        R.BAD_VALUE,
        id="input-dot",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\noutputs = ["build/*.o"]\n',
        'hitz.toml:3: task "a": output "build/*.o" is a glob; outputs are exact paths',
        'to keep every file of a folder, declare the folder: `"build/"`',
        R.BAD_VALUE,
        id="output-glob",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\ninputs = ["build/x.o"]\noutputs = ["build/x.o"]\n',
        'hitz.toml:4: task "a": "build/x.o" is both an input and an output',
        "a task cannot change its own inputs; write to another path",
        R.BAD_VALUE,
        id="output-is-input",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\ninputs = ["gen/"]\noutputs = ["gen/x.c"]\n',
        'hitz.toml:4: task "a": input "gen/" contains output "gen/x.c"',
        "a task cannot change its own inputs; write to another path",
        R.BAD_VALUE,
        id="output-inside-input",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\ninputs = ["gen/cfg.h"]\noutputs = ["gen/"]\n',
        'hitz.toml:4: task "a": output "gen/" contains input "gen/cfg.h"',
        "a task cannot change its own inputs; write to another path",
        R.BAD_VALUE,
        id="output-contains-input",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\nnetwork = "hots"\n',
        'hitz.toml:3: task "a": unknown network "hots"',
        'did you mean "host"?',
        R.BAD_VALUE,
        id="unknown-network",
    ),
    pytest.param(
        '[defaults]\nbackend = "podman"\n[tasks.a]\nrun = "x"\n',
        'hitz.toml:2: [defaults]: unknown backend "podman"',
        '"backend" can be "namespace" or "docker" or "remote"',
        R.BAD_VALUE,
        id="unknown-backend",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\nrootfs = "alpine"\n',
        'hitz.toml:3: task "a": unknown rootfs "alpine"',
        '"rootfs" can be "host", "image:NAME" (images/NAME.toml) or "docker:NAME@sha256:DIGEST"',
        R.BAD_VALUE,
        id="unknown-rootfs",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\nrootfs = "docker:debian:12"\nbackend = "docker"\n',
        'hitz.toml:3: task "a": unknown rootfs "docker:debian:12"',
        'name a local image by its digest, such as "docker:debian@sha256:<64 hex digits>"'
        " (`docker images --digests` lists them); a tag alone can change under you",
        R.BAD_VALUE,
        id="docker-rootfs-without-digest",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\nrootfs = "image:Big"\n',
        'hitz.toml:3: task "a": unknown rootfs "image:Big"',
        'an image name uses lowercase letters, digits, "_", "." and "-", and names a file'
        " images/NAME.toml",
        R.BAD_VALUE,
        id="bad-image-name",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\nbackend = "docker"\n',
        'hitz.toml:3: task "a": backend = "docker" needs an image, but rootfs is "host"',
        'set rootfs = "image:NAME" (an image of images/, built with `hitz image build NAME`)'
        ' or "docker:NAME@sha256:DIGEST"',
        R.BAD_VALUE,
        id="docker-needs-image",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\nrootfs = "docker:debian@sha256:' + "a" * 64 + '"\n',
        'hitz.toml:3: task "a": rootfs "docker:debian@sha256:' + "a" * 64 + '" is a Docker'
        ' image, but backend is "namespace"',
        'set backend = "docker", or use an image of images/ ("image:NAME"), which every'
        " backend can run",
        R.BAD_VALUE,
        id="docker-image-in-namespace",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\nnetwork = 1\n',
        'hitz.toml:3: task "a": "network" must be "none" or "host", got 1',
        None,
        R.WRONG_TYPE,
        id="network-wrong-type",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\n[tasks.a.env]\n"A-B" = "1"\n',
        'hitz.toml:4: task "a": invalid env name "A-B"',
        'names use letters, digits and "_", and do not start with a digit',
        R.BAD_VALUE,
        id="bad-env-name",
    ),
    pytest.param(
        '[tasks.a]\nrun = "x"\nenv = { A = "x\\u0000y" }\n',
        'hitz.toml:3: task "a": env "A" contains a NUL character',
        None,
        R.BAD_VALUE,
        id="nul-in-env",
    ),
    pytest.param(
        '[project]\nname = "demo"\n',
        "hitz.toml: no tasks defined",
        'add a `[tasks.NAME]` table, such as `[tasks.build]` with `run = "make"`',
        R.MISSING_KEY,
        id="no-tasks",
    ),
    pytest.param(
        "",
        "hitz.toml: no tasks defined",
        'add a `[tasks.NAME]` table, such as `[tasks.build]` with `run = "make"`',
        R.MISSING_KEY,
        id="empty-file",
    ),
    pytest.param(
        '[project]\nname = ""\n[tasks.a]\nrun = "x"\n',
        'hitz.toml:2: [project]: "name" is empty',
        None,
        R.BAD_VALUE,
        id="empty-project-name",
    ),
]


@pytest.mark.parametrize(("text", "message", "hint", "reason"), CASES)
def test_error_message(
    project: Path, text: str, message: str, hint: str | None, reason: ManifestErrorReason
) -> None:
    exc = error(text)
    assert str(exc) == message
    assert exc.hint == hint
    assert exc.reason is reason
    assert exc.exit_code == 2
    assert exc.path == "hitz.toml"


def test_error_detail_has_the_line_and_a_caret(project: Path) -> None:
    exc = error('[tasks.test]\nrun = "x"\n\n\n\n\n\n\n\n\n\n\n\ntimeout = 5\n')
    assert str(exc) == (
        'hitz.toml:14: task "test": "timeout" must be a duration such as "90s" or "5m", got 5'
    )
    assert (exc.line, exc.column) == (14, 11)
    assert exc.detail == "  14 | timeout = 5\n     |           ^"


def test_unknown_key_caret_is_under_the_key(project: Path) -> None:
    exc = error('[tasks.test]\nrun = "x"\n  timout = "5m"\n')
    assert exc.detail == '   3 |   timout = "5m"\n     |   ^'


def test_item_in_multiline_array_is_pointed_at(project: Path) -> None:
    exc = error('[tasks.a]\nrun = "x"\ninputs = [\n  "ok",\n  ":nope",\n]\n')
    assert str(exc) == 'hitz.toml:5: task "a": unknown task ":nope"'
    assert exc.detail == '   5 |   ":nope",\n     |   ^'


def test_toml_syntax_error_keeps_tomllib_column(project: Path) -> None:
    exc = error("[tasks.a]\nrun = x\n")
    assert (exc.line, exc.column) == (2, 7)
    assert exc.detail == "   2 | run = x\n     |       ^"


def test_toml_syntax_error_at_end_of_document(project: Path) -> None:
    exc = error('[tasks.a]\nrun = "x"\nenv = { A = "1"')
    assert str(exc) == "hitz.toml:3: TOML syntax error: unclosed inline table"
    assert exc.line == 3


def test_first_error_in_the_file_wins(project: Path) -> None:
    exc = error(
        '[tasks.a]\nrun = "x"\ninputs = "a"\n[tasks.b]\nrun = 1\n[tasks.c]\nrun = "x"\ntimout = 1\n'
    )
    assert str(exc) == 'hitz.toml:3: task "a": "inputs" must be a list of strings, got "a"'


def test_messages_use_the_path_as_given(project: Path) -> None:
    (project / "sub").mkdir()
    (project / "sub" / "m.toml").write_text('[tasks.a]\nrun = "x"\noutputs = ["/x"]\n')
    with pytest.raises(ManifestError) as info:
        load("sub/m.toml")
    assert str(info.value) == 'sub/m.toml:3: task "a": output "/x" is outside the project'
    assert info.value.hint == "paths are relative to the folder that holds `sub/m.toml`"


def test_duplicate_output_names_the_first_line_in_a_dotted_manifest(project: Path) -> None:
    exc = error(
        'tasks.a.run = "x"\ntasks.a.outputs = ["out/"]\n'
        'tasks.b = { run = "y", outputs = ["out/f"] }\n'
    )
    assert str(exc) == (
        'hitz.toml:3: task "b": output "out/f" is inside output "out/" of task "a" at hitz.toml:2'
    )


# --- reading errors ------------------------------------------------------------


def test_missing_file(project: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load("hitz.toml")
    assert str(info.value) == "hitz.toml: no such file"
    assert info.value.reason is R.NOT_FOUND
    assert info.value.hint == "create `hitz.toml`, or name another manifest with `--config PATH`"


def test_directory_instead_of_file(project: Path) -> None:
    (project / "examples").mkdir()
    with pytest.raises(ManifestError) as info:
        load("examples")
    assert str(info.value) == "examples: is a directory, not a manifest"
    assert info.value.reason is R.NOT_FOUND
    assert info.value.hint == "name the file itself, such as `--config examples/hitz.toml`"


def test_not_utf8(project: Path) -> None:
    Path("hitz.toml").write_bytes(b'[tasks.a]\nrun = "caf\xe9"\n')
    with pytest.raises(ManifestError) as info:
        load("hitz.toml")
    assert str(info.value) == "hitz.toml:2: not UTF-8 text: byte 0xe9 cannot be decoded"
    assert info.value.reason is R.TOML_SYNTAX


def test_byte_order_mark_is_accepted(project: Path) -> None:
    Path("hitz.toml").write_bytes(b'\xef\xbb\xbf[tasks.a]\nrun = "x"\n')
    assert load("hitz.toml").tasks["a"].line == 1


# --- durations -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("2h", 7200.0),
        ("1.5h", 5400.0),
        ("1h2m3s4ms", 3723.004),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "90", "5 m", "m", "1h1h", "30m1h", "1d", "-5s", "1e3s", ".5s", "5s ", "5M", "ms"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_parse_duration_rejects_non_strings_and_overflow() -> None:
    with pytest.raises(ValueError):
        parse_duration(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too long"):
        parse_duration("9" * 400 + "h")


@given(
    hours=st.none() | st.integers(0, 10_000),
    minutes=st.none() | st.integers(0, 10_000),
    seconds=st.none() | st.integers(0, 10_000),
    millis=st.none() | st.integers(0, 10_000),
)
def test_parse_duration_round_trips(
    hours: int | None, minutes: int | None, seconds: int | None, millis: int | None
) -> None:
    parts = [(hours, "h"), (minutes, "m"), (seconds, "s"), (millis, "ms")]
    text = "".join(f"{n}{unit}" for n, unit in parts if n is not None)
    if not text:
        return
    expected = (hours or 0) * 3600 + (minutes or 0) * 60 + (seconds or 0) + (millis or 0) / 1000
    assert parse_duration(text) == pytest.approx(expected)
    assert re.fullmatch(DURATION_PATTERN, text)


# --- suggest -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "candidates", "expected"),
    [
        ("tset", ["build", "test"], "test"),
        ("timout", ["run", "timeout"], "timeout"),
        ("Build", ["build"], "build"),
        ("hots", ["none", "host"], "host"),
        ("docker", ["namespace"], None),
        ("x", [], None),
    ],
)
def test_suggest(word: str, candidates: list[str], expected: str | None) -> None:
    assert suggest(word, iter(candidates)) == expected


# --- JSON Schema ---------------------------------------------------------------


def test_json_schema() -> None:
    schema = json_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["tasks"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["defaults"] == {
        "$ref": "#/$defs/Defaults",
        "description": "What every task inherits.",
    }
    tasks = schema["properties"]["tasks"]
    assert tasks["additionalProperties"] == {"$ref": "#/$defs/Task"}
    assert tasks["propertyNames"] == {"pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]*$"}
    task = schema["$defs"]["Task"]
    assert task["required"] == ["run"]
    assert task["additionalProperties"] is False
    assert set(task["properties"]) == {
        "description",
        "run",
        "inputs",
        "outputs",
        "deps",
        "env",
        "timeout",
        "network",
        "backend",
        "rootfs",
        "cache",
        "seccomp",
        "capabilities",
        "limits",
        "landlock",
    }
    assert "default" not in task["properties"]["timeout"]
    assert schema["$defs"]["Defaults"]["properties"]["timeout"]["default"] == "10m"
    pattern = task["properties"]["timeout"]["pattern"]
    assert re.fullmatch(pattern, "1h30m") and not re.fullmatch(pattern, "90")


def test_importing_the_loader_does_not_import_pydantic() -> None:
    code = "import sys, hitz.executor.manifest; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- size ----------------------------------------------------------------------


def test_many_tasks_keep_their_lines(project: Path) -> None:
    blocks = [
        f'[tasks.t{i}]\nrun = "x"\ninputs = [":t{i - 1}"]\noutputs = ["out/{i}"]\n'
        if i
        else '[tasks.t0]\nrun = "x"\n'
        for i in range(500)
    ]
    manifest = load_text("\n".join(blocks))
    assert manifest.tasks["t0"].line == 1
    assert manifest.tasks["t1"].line == 4
    assert manifest.tasks["t499"].line == 1 + 3 + 5 * 498
    assert manifest.tasks["t499"].deps == ("t498",)
    # The same lines from the full scan (forced by a multi-line string).
    multiline = load_text("\n".join(blocks) + "\n[tasks.z]\nrun = '''\nx\n'''\n")
    assert [t.line for t in multiline.tasks.values()][:-1] == [
        t.line for t in manifest.tasks.values()
    ]


def test_deep_nesting_is_an_error_or_a_partial_scan(project: Path) -> None:
    deep = "[" * 5000 + "]" * 5000
    exc = error(f'[tasks.a]\nrun = "x"\ninputs = {deep}\n')
    assert exc.reason in (R.TOML_SYNTAX, R.WRONG_TYPE)
    assert scan(f"x = {deep}\n").keys[("x",)] == (1, 1)


def test_quoted_task_names_get_their_header_line(project: Path) -> None:
    manifest = load_text('[tasks."v1.2"]\nrun = "x"\n\n[tasks.b]\nrun = "y"\n')
    assert [(t.name, t.line) for t in manifest.tasks.values()] == [("v1.2", 1), ("b", 4)]


# --- [remote]: the executor's token and CA file ---------------------------------------


def test_remote_takes_the_token_and_ca_keys_of_cache(project: Path) -> None:
    manifest = load_text("""\
        [remote]
        executor = "grpcs://build.example.com:443"
        token_env = "HITZ_EXEC_TOKEN"
        ca_file = "certs/ca.pem"

        [tasks.t]
        run = "true"
        """)
    assert (manifest.remote_executor, manifest.remote_token_env, manifest.remote_token_file,
            manifest.remote_ca_file) == ("grpcs://build.example.com:443", "HITZ_EXEC_TOKEN",
                                         None, "certs/ca.pem")


@pytest.mark.parametrize("keys, message", [
    ('token_env = "not a name"',
     'hitz.toml:3: "token_env" must name an environment variable, got "not a name"'),
    ('token_env = "T"\ntoken_file = "t"', 'hitz.toml:4: set "token_env" or "token_file", not both'),
    ('ca_file = " "', 'hitz.toml:3: "ca_file" must be a path, got ""'),
    ('token_file = ""', 'hitz.toml:3: "token_file" must be a path, got ""'),
])
def test_remote_token_and_ca_errors_name_the_line(project: Path, keys: str, message: str) -> None:
    exc = error(f'[remote]\nexecutor = "grpc://127.0.0.1:8980"\n{keys}\n\n'
                '[tasks.t]\nrun = "true"\n')
    assert exc.message == message
    assert exc.reason is R.BAD_VALUE


def test_a_token_in_remote_is_an_unknown_key(project: Path) -> None:
    exc = error('[remote]\ntoken = "s3cret"\n\n[tasks.t]\nrun = "true"\n')
    assert exc.reason is R.UNKNOWN_KEY
    assert "s3cret" not in exc.message
