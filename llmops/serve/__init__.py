"""Serving a model over an OpenAI-compatible HTTP API.

- `model`: loading a transformers model (+ PEFT adapter) and generating (shared with evals);
- `openai_api`: request validation and response shapes of the OpenAI API;
- `server`: the HTTP server and its hooks (request logging, feedback);
- `main`: `python -m llmops.serve` (arguments, request store, signals);
- `process`: starting, checking and stopping that server as a background process.

Nothing here imports torch or transformers at module level.
"""

from __future__ import annotations
