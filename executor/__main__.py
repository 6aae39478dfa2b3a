"""`python -m hitz.executor` is `hitz`."""

from hitz.executor.cli import main

main()
