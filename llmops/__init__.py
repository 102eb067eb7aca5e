"""llmops: a declarative GitOps CLI for the life of a fine-tuned language model.

The package root holds the core (config, graph, fingerprints, lockfile, plan, apply);
resource kinds live in `llmops.providers`, the terminal UI in `llmops.cli`. Nothing here
imports torch, transformers, mlflow or dvc at module level: `llmops --help` must stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"
# The name pip installs this project by; `llmops` on PyPI is someone else's package.
DISTRIBUTION = "llmops-gitops"
