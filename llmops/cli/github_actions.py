"""What `llmops validate` and `llmops plan` tell GitHub Actions themselves (when GITHUB_ACTIONS=true).

- **Annotations**: one `::error file=F,line=L,col=C,title=T::message` workflow command per
  diagnostic, on stderr (the runner reads workflow commands on both streams; stdout stays the
  command's output: JSON, markdown). F is relative to GITHUB_WORKSPACE, the repository root, so
  the annotation lands on the right line of a pull request's diff also when the project sits in
  a subfolder.
- **Job summary**: markdown appended to the file named by GITHUB_STEP_SUMMARY (the plan, or the
  problems that stopped it).
- **Step outputs**: `name=value` lines appended to the file named by GITHUB_OUTPUT (`changes`,
  counts per action, `valid`, ...), the heredoc form for a value with a line break.

Escaping follows the runner's rules for workflow commands: in the message `%`, CR and LF
become `%25`, `%0D`, `%0A`; in property values also `:` and `,` become `%3A` and `%2C`.
Nothing here reads the project: callers pass diagnostics, plans and markdown in.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from llmops.errors import Diagnostic
from llmops.engine.plan import CHANGE_ACTIONS, Plan

_LEVEL = {"error": "error", "warning": "warning"}  # anything else is a notice


@dataclass(frozen=True)
class ActionsEnv:
    """The parts of a GitHub Actions step's environment that llmops writes to.

    Built only when GITHUB_ACTIONS is "true"; a file that is not named is not written.
    """

    workspace: Path | None = None
    summary: Path | None = None
    output: Path | None = None

    @classmethod
    def detect(cls, environ: Mapping[str, str] | None = None) -> "ActionsEnv | None":
        env = os.environ if environ is None else environ
        if env.get("GITHUB_ACTIONS") != "true":
            return None

        def path(var: str) -> Path | None:
            value = env.get(var, "").strip()
            return Path(value) if value else None

        return cls(workspace=path("GITHUB_WORKSPACE"), summary=path("GITHUB_STEP_SUMMARY"),
                   output=path("GITHUB_OUTPUT"))

    def write_summary(self, markdown: str) -> None:
        if self.summary is not None:
            _append(self.summary, markdown if markdown.endswith("\n") else markdown + "\n")

    def write_outputs(self, values: Mapping[str, object]) -> None:
        if self.output is not None and values:
            _append(self.output, format_outputs(values))


def _append(path: Path, text: str) -> None:
    # Append, never replace: earlier steps' (and commands') lines are in the same file.
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def workflow_command(command: str, message: str, **properties: object) -> str:
    """`::command k=v,...::message` with the runner's escaping; empty properties are left out."""
    props = ",".join(f"{k}={escape_property(str(v))}" for k, v in properties.items() if v not in (None, "", 0))
    return f"::{command}{' ' + props if props else ''}::{escape_data(message)}"


def repository_path(file: str, root: Path, workspace: Path | None) -> str:
    """`file` (relative to the project `root`) as a path relative to the repository root, which
    GitHub needs to place an annotation; `file` itself when it lies outside the workspace."""
    if not file or workspace is None:
        return file
    path = Path(file) if Path(file).is_absolute() else root / file
    try:
        return path.resolve().relative_to(workspace.resolve()).as_posix()
    except (OSError, ValueError):
        return file


def annotation(d: Diagnostic, root: Path, workspace: Path | None) -> str:
    message = d.summary + (f" (hint: {d.hint})" if d.hint else "")
    return workflow_command(
        _LEVEL.get(d.severity, "notice"), message,
        file=repository_path(d.file, root, workspace), line=d.line if d.file else 0,
        col=d.column if d.file and d.line else 0, title=f"llmops: {d.path}" if d.path else "llmops",
    )


def annotations(diags: Iterable[Diagnostic], root: Path, workspace: Path | None) -> list[str]:
    return [annotation(d, root, workspace) for d in diags]


def error_annotation(title: str, message: str) -> str:
    """An error that has no source position (a store that cannot be reached, a stale lock...)."""
    return workflow_command("error", message, title=title)


def _cell(text: str) -> str:
    # The text comes from llmops.yaml (a pull request's): no table breaks, no raw HTML.
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\r", " ").replace("\n", " ")


def diagnostics_markdown(command: str, diags: list[Diagnostic], root: Path, workspace: Path | None) -> str:
    n = len(diags)
    rows = [f"### `llmops {command}`: {n} problem{'s' if n != 1 else ''} in the configuration", "",
            "| where | problem |", "|---|---|"]
    for d in diags:
        where = repository_path(d.file, root, workspace) or "llmops.yaml"
        if d.file and d.line:
            where += f":{d.line}:{d.column or 1}"
        problem = (f"{d.path}: " if d.path else "") + d.summary + (f" (hint: {d.hint})" if d.hint else "")
        rows.append(f"| {_cell(where)} | {_cell(problem)} |")
    return "\n".join(rows) + "\n"


def error_markdown(command: str, message: str) -> str:
    fence = "````" if "```" in message else "```"
    return f"### `llmops {command}` failed\n\n{fence}\n{message}\n{fence}\n"


def plan_outputs(plan: Plan) -> dict[str, object]:
    """`changes` (true/false, as `--detailed-exitcode` 2/0), one count per action, open alerts."""
    counts = plan.summary()
    values: dict[str, object] = {"error": "false", "changes": "true" if plan.has_changes else "false"}
    values.update({action: counts[action] for action in CHANGE_ACTIONS})
    values["alerts"] = len(plan.alerts)
    return values


def format_outputs(values: Mapping[str, object]) -> str:
    lines: list[str] = []
    for name, value in values.items():
        text = str(value)
        if "\n" in text or "\r" in text:
            delimiter = f"ghadelimiter_{uuid.uuid4()}"  # cannot occur in the value
            lines += [f"{name}<<{delimiter}", text, delimiter]
        else:
            lines.append(f"{name}={text}")
    return "\n".join(lines) + "\n"
