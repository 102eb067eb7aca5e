"""Hostile inputs for tests/test_hostile.py (a table that writes each case's files)."""
