"""`python -m llmops.train SPEC_JSON`: the training job entry point (see llmops.train.job)."""

from __future__ import annotations

import sys

from llmops.train.job import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
