"""Fuzz suites of every door (issue 11, point 5); shared helpers in harness.py."""
