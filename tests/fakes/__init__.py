"""Small in-memory fakes that stand in for hitz's seams in unit tests."""
