"""Runners: where training and serving processes run (local subprocess, Docker container).

A runner knows nothing of resource kinds; providers hand it a `Job`.
"""
