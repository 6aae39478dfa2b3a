#!/bin/sh
# Runs the built program and compares its output with EXPECTED, in which
# @VERSION@ stands for the contents of VERSION_FILE. Exits non-zero, with a
# diff on stderr, if the program fails or prints anything else.
# Usage: check.sh BINARY EXPECTED VERSION_FILE
set -eu

binary=$1
expected=$2
version=$(cat "$3")

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

sed "s/@VERSION@/$version/" "$expected" > "$scratch/expected"
status=0
"$binary" > "$scratch/actual" || status=$?
if [ "$status" -ne 0 ]; then
    echo "FAIL: $binary exited with status $status" >&2
    exit 1
fi
if ! diff -u "$scratch/expected" "$scratch/actual" >&2; then
    echo "FAIL: $binary printed unexpected output (diff above: - expected, + actual)" >&2
    exit 1
fi
echo "ok: $binary output matches $expected"
