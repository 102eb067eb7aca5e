"""The runner interface shared by the local and Docker runners."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Job:
    """One process to run to completion.

    `module` and `args` form `python -m MODULE ARGS...`; the runner picks the interpreter
    (the current one locally, the image's in a container). `log_path` receives the whole
    combined stdout/stderr; `on_line` sees each line as it arrives (progress parsing).
    """

    name: str
    module: str
    args: list[str]
    workdir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    gpus: int = 0
    image: str | None = None


@dataclass
class JobResult:
    exit_code: int
    log_tail: str
    image_digest: str | None = None


class Runner(ABC):
    @abstractmethod
    def run(
        self,
        job: Job,
        on_line: Callable[[str], None] = lambda line: None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> JobResult:
        """Run the job to completion (or until `cancelled()` turns true: then stop it)."""
