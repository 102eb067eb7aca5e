"""The outside systems llmops talks to through their own libraries: MLflow (tracking and the
registries) and the optional extras that store URLs need. DVC runs as a subprocess from
`llmops.data.stage` and `llmops.providers.datasets`.
"""
