"""hitz.executor: manifest, planner, scheduler, reports and the CLI."""
