"""The outside systems llmops talks to through their own libraries: MLflow (tracking and the
registries) and the optional extras that store URLs need. DVC runs as subprocesses, forked from a
warm DVC interpreter (`dvcrun`), for `llmops.providers.datasets`.
"""
