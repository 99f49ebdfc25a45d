"""Whole-daemon high-availability tests: several replicas on PostgreSQL (issue 6)."""
