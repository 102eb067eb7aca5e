"""`python -m llmops.serve ...`: run the OpenAI-compatible model server in the foreground."""

from __future__ import annotations

from llmops.serve.main import main

raise SystemExit(main())
