"""Serving control: status and stop of a model server, whichever kind its state file records.

`llmops.serve.process` (a local process) and `llmops.serve.container` (a container of the
Docker runner) start their own kind and share `llmops.serve.endpoint` (state file, ports,
/health, pid check); neither imports the other. Status and stop dispatch here, by the
state file's kind, so callers treat both kinds of server alike. `server_status`,
`server_monitor` and `other_server_at` only read: they start and stop nothing.
"""

from __future__ import annotations

from pathlib import Path

from llmops.serve.container import stop_container
from llmops.serve.endpoint import (ServerStatus, is_container_state, other_server_at, read_state, server_monitor,
                                   server_status)
from llmops.serve.process import stop_process

__all__ = ["ServerStatus", "other_server_at", "server_monitor", "server_status", "stop_server"]


def stop_server(state_file: Path | str, timeout: float = 15.0) -> bool:
    """Stop the server recorded in `state_file`, local process or container alike, and remove
    the state file. Returns whether a running server was stopped (no state file: False)."""
    state = read_state(state_file)
    if state is None:
        return False
    if is_container_state(state):  # started by the Docker runner
        return stop_container(state_file, state, timeout=timeout)
    return stop_process(state_file, state, timeout=timeout)
