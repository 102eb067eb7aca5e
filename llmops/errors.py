"""Error types shared by every layer.

Every error carries a message a person can act on; messages end with what to do.
Validation collects all problems as `Diagnostic`s instead of stopping at the first.
Only `llmops.cli.main` turns these into exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class LlmopsError(Exception):
    """Base error: `message` is required and is shown to the user as is."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Diagnostic:
    """One validation problem, with its source position when known (1-based)."""

    summary: str
    path: str = ""  # dotted path inside the document, e.g. finetunes.lora.base_model
    file: str = ""
    line: int = 0
    column: int = 0
    hint: str = ""
    severity: str = "error"

    def format(self) -> str:
        where = self.file or "<config>"
        if self.line:
            where += f":{self.line}:{self.column or 1}"
        text = f"{where}: {self.severity}: "
        if self.path:
            text += f"{self.path}: "
        text += self.summary
        if self.hint:
            text += f" (hint: {self.hint})"
        return text

    def to_dict(self) -> dict:
        return {
            "severity": self.severity,
            "summary": self.summary,
            "path": self.path,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "hint": self.hint,
        }


@dataclass
class ValidationError(LlmopsError):
    """The configuration has one or more problems; all of them are in `diagnostics`."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        n = len(diagnostics)
        lines = [d.format() for d in diagnostics]
        lines.append(f"{n} error{'s' if n != 1 else ''} found; fix them and run `llmops validate` again.")
        super().__init__("\n".join(lines))


class LockfileError(LlmopsError):
    """llmops.lock cannot be read or was written by an incompatible version."""


class PlanError(LlmopsError):
    """A plan cannot be made (for example it would delete a protected resource)."""


class StalePlanError(LlmopsError):
    """A saved plan no longer matches the lock, config or live state."""


class ApplyLockedError(LlmopsError):
    """Another apply holds the project's apply lock."""


class ProviderError(LlmopsError):
    """A provider failed to apply, refresh or delete a resource."""


class GateError(ProviderError):
    """A deployment's evaluation gate did not pass; nothing was promoted."""
