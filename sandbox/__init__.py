"""hitz.sandbox: the sandbox backends and the spec they share.

Importing this package is cheap (no pydantic, no backend); a backend is
imported only when a task needs it.
"""
