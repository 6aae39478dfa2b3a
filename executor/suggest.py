"""Did-you-mean: the nearest known name to a misspelt one."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# difflib's similarity ratio below which a candidate is not worth suggesting:
# "tset"/"test" scores 0.75 and "timout"/"timeout" 0.92, while unrelated words
# such as "docker"/"namespace" stay under 0.3.
_CUTOFF = 0.6


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word``, or None if none is close.

    A candidate that differs from ``word`` only in case wins outright;
    otherwise the best ``difflib`` match scoring at least 0.6 is returned.
    ``candidates`` is read once; it may be any iterable. Never raises.
    """
    pool = list(candidates)
    folded = word.casefold()
    for candidate in pool:
        if candidate.casefold() == folded:
            return candidate
    matches = difflib.get_close_matches(word, pool, n=1, cutoff=_CUTOFF)
    return matches[0] if matches else None
