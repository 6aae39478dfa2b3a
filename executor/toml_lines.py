"""Where each key and value of a TOML document is written.

``tomllib`` returns plain values with no positions, but every manifest error
must name a line. ``scan`` walks the text once more and records, for every key
path, the line and column of its key and of its value::

    [tasks.build]                 ("tasks", "build")            key: line 1, col 8
    inputs = [                    ("tasks", "build", "inputs")  key: line 2, col 1
      "src/*.c",                  ("tasks", "build", "inputs", 0)      line 3, col 3
      ":codegen",                 ("tasks", "build", "inputs", 1)      line 4, col 3
    ]
    env.CC = "gcc"                ("tasks", "build", "env", "CC")      line 6, col 5

Only text that ``tomllib`` already accepted is scanned, so the scanner follows
structure (headers, dotted keys, inline tables, arrays, the four string forms,
comments) and does not validate anything. It never raises: on text it does not
understand it skips a character and carries on, and the positions it did record
stay right.
"""

from __future__ import annotations

import bisect
import re
import tomllib
from dataclasses import dataclass, field

# (line, column), both 1-based; the column counts characters.
Pos = tuple[int, int]
KeyPath = tuple[str | int, ...]

_SPACE = re.compile(r"[ \t]*")
# Whitespace, newlines and comments: everything allowed between array items.
_BLANK = re.compile(r"(?:[ \t\r\n]+|#[^\n]*)*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_BASIC = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_LITERAL = re.compile(r"'[^'\n]*'")
# A multi-line string may end with up to two extra quotes (`""""` is `"` + `"""`),
# hence the lazy body and the look-ahead.
_ML_BASIC = re.compile(r'"""(?:[^\\]|\\.)*?"""(?!")', re.DOTALL)
_ML_LITERAL = re.compile(r"'''.*?'''(?!')", re.DOTALL)
# Numbers, booleans and dates run until the next delimiter (a date may hold a space).
_SCALAR = re.compile(r"[^,\]}\r\n#]+")
_REST_OF_LINE = re.compile(r"[^\n]*")


@dataclass
class SourceMap:
    """Positions of a scanned document.

    ``keys`` holds the position of each key (for a table, the last name in its
    header; for an array item, the item itself). A table first named by a
    longer header or dotted key (``[tasks.a.env]``, ``tasks.a.run = ...``) maps
    to that first mention until its own header is seen. ``values`` holds where
    each key's value starts.
    """

    keys: dict[KeyPath, Pos] = field(default_factory=dict)
    values: dict[KeyPath, Pos] = field(default_factory=dict)

    def line(self, path: KeyPath) -> int | None:
        """The line of ``path``, or of its longest prefix that has one."""
        pos = self.key(path)
        return pos[0] if pos else None

    def key(self, path: KeyPath) -> Pos | None:
        """Where the key of ``path`` (or of its longest known prefix) is."""
        for end in range(len(path), 0, -1):
            pos = self.keys.get(path[:end])
            if pos is not None:
                return pos
        return None

    def value(self, path: KeyPath) -> Pos | None:
        """Where the value of ``path`` starts; else where its key is."""
        return self.values.get(path) or self.key(path)

    def lines(self) -> dict[KeyPath, int]:
        """Every key path with the line of its key."""
        return {path: pos[0] for path, pos in self.keys.items()}


def scan(text: str) -> SourceMap:
    """Record the position of every key, table and array item in ``text``.

    ``text`` should be a document ``tomllib`` accepts; anything else gives a
    partial map, never an exception. So does nesting deeper than Python's
    recursion limit: the scan stops there.
    """
    scanner = _Scanner(text)
    try:
        return scanner.document()
    except RecursionError:
        return scanner.map


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.map = SourceMap()
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        # Array-of-tables headers seen so far, by path: how many elements each has.
        self.arrays: dict[KeyPath, int] = {}

    def pos(self, offset: int) -> Pos:
        line = bisect.bisect_right(self.line_starts, offset)
        return line, offset - self.line_starts[line - 1] + 1

    def document(self) -> SourceMap:
        text, n = self.text, len(self.text)
        table: KeyPath = ()
        while True:
            self.i = _skip(_BLANK, text, self.i)
            if self.i >= n:
                return self.map
            start = self.i
            if text[start] == "[":
                table = self.header()
            else:
                self.keyval(table)
            self.i = _skip(_REST_OF_LINE, text, self.i)
            if self.i == start:
                self.i += 1

    def header(self) -> KeyPath:
        is_array = self.text.startswith("[[", self.i)
        self.i += 2 if is_array else 1
        keys = self.key()
        path: KeyPath = ()
        for k, (name, offset) in enumerate(keys):
            path += (name,)
            if is_array and k == len(keys) - 1:
                # `[[a]]` appends a table to array "a": its path ends with the index.
                self.map.keys.setdefault(path, self.pos(offset))
                index = self.arrays.get(path, 0)
                self.arrays[path] = index + 1
                path += (index,)
            elif path in self.arrays:
                # `[a.b]` after `[[a]]` belongs to the last element of "a".
                path += (self.arrays[path] - 1,)
            if k == len(keys) - 1:
                self.map.keys[path] = self.pos(offset)
            else:
                self.map.keys.setdefault(path, self.pos(offset))
        return path

    def key(self) -> list[tuple[str, int]]:
        """A dotted key: each name with the offset where it starts."""
        text = self.text
        names: list[tuple[str, int]] = []
        while True:
            self.i = _skip(_SPACE, text, self.i)
            start = self.i
            match = (
                _BARE_KEY.match(text, start)
                or _BASIC.match(text, start)
                or _LITERAL.match(text, start)
            )
            if match is None:
                return names
            self.i = match.end()
            names.append((_key_name(match.group()), start))
            self.i = _skip(_SPACE, text, self.i)
            if not text.startswith(".", self.i):
                return names
            self.i += 1

    def keyval(self, base: KeyPath) -> None:
        keys = self.key()
        if not keys:
            return
        path = base
        for name, offset in keys[:-1]:
            path += (name,)
            self.map.keys.setdefault(path, self.pos(offset))
        path += (keys[-1][0],)
        self.map.keys[path] = self.pos(keys[-1][1])
        self.i = _skip(_SPACE, self.text, self.i)
        if not self.text.startswith("=", self.i):
            return
        self.i = _skip(_SPACE, self.text, self.i + 1)
        self.value(path)

    def value(self, path: KeyPath) -> None:
        text, start = self.text, self.i
        if start >= len(text):
            return
        self.map.values[path] = self.pos(start)
        char = text[start]
        if char == "[":
            self.array(path)
        elif char == "{":
            self.inline_table(path)
        else:
            if text.startswith('"""', start):
                pattern = _ML_BASIC
            elif char == '"':
                pattern = _BASIC
            elif text.startswith("'''", start):
                pattern = _ML_LITERAL
            elif char == "'":
                pattern = _LITERAL
            else:
                pattern = _SCALAR
            match = pattern.match(text, start)
            self.i = match.end() if match else start + 1

    def array(self, path: KeyPath) -> None:
        text, n = self.text, len(self.text)
        self.i += 1
        index = 0
        while True:
            self.i = _skip(_BLANK, text, self.i)
            if self.i >= n:
                return
            if text[self.i] == "]":
                self.i += 1
                return
            start = self.i
            item = (*path, index)
            self.map.keys[item] = self.pos(start)
            self.value(item)
            index += 1
            self.i = _skip(_BLANK, text, self.i)
            # Stepping over a character the scanner did not consume keeps it moving.
            if text.startswith(",", self.i) or self.i == start:
                self.i += 1

    def inline_table(self, path: KeyPath) -> None:
        text, n = self.text, len(self.text)
        self.i += 1
        while True:
            self.i = _skip(_BLANK, text, self.i)
            if self.i >= n:
                return
            if text[self.i] == "}":
                self.i += 1
                return
            start = self.i
            self.keyval(path)
            self.i = _skip(_BLANK, text, self.i)
            if text.startswith(",", self.i) or self.i == start:
                self.i += 1


def _skip(pattern: re.Pattern[str], text: str, offset: int) -> int:
    """The offset after ``pattern`` matched at ``offset`` (patterns that may match nothing)."""
    match = pattern.match(text, offset)
    return match.end() if match else offset


def _key_name(raw: str) -> str:
    if raw[0] == "'":
        return raw[1:-1]
    if raw[0] == '"':
        if "\\" not in raw:
            return raw[1:-1]
        # Escapes are rare in keys: let tomllib decode them exactly.
        try:
            name = tomllib.loads(f"k = {raw}")["k"]
        except tomllib.TOMLDecodeError:
            return raw[1:-1]
        return name if isinstance(name, str) else raw[1:-1]
    return raw
