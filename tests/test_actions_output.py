"""`llmops validate` and `llmops plan` under GitHub Actions (GITHUB_ACTIONS=true): annotations
at the source line, relative to the repository root; the job summary and step outputs written
by the commands themselves. The real CLI in a project that sits in a subfolder of the
"repository" (GITHUB_WORKSPACE), and the escaping rules on their own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmops.cli.github_actions import escape_data, escape_property, format_outputs, workflow_command

BROKEN = """\
version: 1
project: t
datasets:
  a:
    source: data/missing.jsonl
finetunes:
  f:
    base_model: nope
    dataset: a
    prompt: p
prompts:
  p: {text: "{{ q }}", variables: [q]}
"""

VALID = """\
version: 1
project: t
datasets:
  a: {source: data/a.jsonl}
prompts:
  p: {text: "{{ q }}", variables: [q]}
"""


@pytest.fixture
def repo(tmp_path: Path):
    """A checkout (GITHUB_WORKSPACE) holding the project in `ml/`, and the files the runner names."""
    workspace = tmp_path / "workspace"
    (workspace / "ml").mkdir(parents=True)
    summary, output = tmp_path / "step_summary.md", tmp_path / "github_output"
    summary.touch()
    output.touch()
    env = {"GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(workspace),
           "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_OUTPUT": str(output)}
    return workspace / "ml", env, summary, output


def _outputs(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _annotations(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("::")]


def _project(project, root: Path, config: str):
    project.root = root
    return project.write({"llmops.yaml": config, "data/a.jsonl": '{"q": "x"}\n'})


@pytest.mark.parametrize("command", [("validate",), ("validate", "--json"), ("plan", "--markdown")])
def test_a_broken_project_annotates_each_problem_at_its_line(project, repo, command):
    root, env, summary, output = repo
    _project(project, root, BROKEN)
    proc = project.run(*command, env=env)
    assert proc.returncode == 1
    lines = _annotations(proc.stderr)
    assert lines == [
        "::error file=ml/llmops.yaml,line=5,col=5,title=llmops%3A datasets.a.source::file not found: "
        "data/missing.jsonl (hint: paths are relative to the project folder " + str(root) + ")",
        "::error file=ml/llmops.yaml,line=8,col=5,title=llmops%3A finetunes.f.base_model::unknown base model "
        "'nope' (hint: define it under `base_models:`)",
    ]
    assert not _annotations(proc.stdout)  # stdout stays the command's output (JSON, markdown)
    text = summary.read_text()
    assert f"### `llmops {command[0]}`: 2 problems in the configuration" in text
    assert "| ml/llmops.yaml:8:5 | finetunes.f.base_model: unknown base model 'nope'" in text
    if command[0] == "validate":
        assert _outputs(output) == {"valid": "false", "errors": "2"}
    else:
        assert _outputs(output) == {"error": "true"}


def test_a_valid_project_plans_into_the_summary_and_outputs(project, repo):
    root, env, summary, output = repo
    _project(project, root, VALID)
    proc = project.run("plan", "--markdown", "--detailed-exitcode", env=env)
    assert proc.returncode == 2, proc.stderr
    assert not _annotations(proc.stderr)
    assert _outputs(output) == {"error": "false", "changes": "true", "create": "2", "update": "0",
                                "restore": "0", "replace": "0", "delete": "0", "alerts": "0"}
    # the summary is the comment's markdown, written once
    assert summary.read_text().strip() == proc.stdout.strip()
    assert summary.read_text().count("<!-- llmops-plan -->") == 1 and "| `datasets.a` | 🟢 create |" in summary.read_text()

    proc = project.run("validate", env=env)
    assert proc.returncode == 0 and not _annotations(proc.stderr)
    assert _outputs(output)["valid"] == "true" and _outputs(output)["resources"] == "2"


def test_a_plan_with_no_changes_says_so(project, repo):
    root, env, summary, output = repo
    _project(project, root, "version: 1\nproject: t\n")
    proc = project.run("plan", env=env)  # the terminal rendering: the summary is still markdown
    assert proc.returncode == 0, proc.stderr
    assert _outputs(output)["changes"] == "false"
    assert "**No changes.**" in summary.read_text()


def test_an_error_without_a_source_position_is_one_annotation(project, repo):
    root, env, summary, output = repo
    proc = project.run("-C", str(root), "plan", env=env)  # no llmops.yaml there
    assert proc.returncode == 1
    (line,) = _annotations(proc.stderr)
    assert line.startswith("::error title=llmops plan::llmops.yaml: file not found.")
    assert "### `llmops plan` failed" in summary.read_text()
    assert _outputs(output) == {"error": "true"}


def test_outside_github_actions_nothing_is_written(project, repo):
    root, env, summary, output = repo
    _project(project, root, BROKEN)
    proc = project.run("validate", env={**env, "GITHUB_ACTIONS": ""})
    assert proc.returncode == 1 and not _annotations(proc.stderr)
    assert summary.read_text() == "" and output.read_text() == ""


def test_a_file_outside_the_workspace_keeps_its_project_path(project, repo, tmp_path: Path):
    root, env, summary, output = repo
    _project(project, root, BROKEN)
    proc = project.run("validate", env={**env, "GITHUB_WORKSPACE": str(tmp_path / "elsewhere")})
    assert _annotations(proc.stderr)[0].startswith("::error file=llmops.yaml,line=5,col=5,")


@pytest.mark.parametrize(("text", "data", "prop"), [
    ("plain", "plain", "plain"),
    ("50% done", "50%25 done", "50%25 done"),
    ("two\nlines\r\n", "two%0Alines%0D%0A", "two%0Alines%0D%0A"),
    ("a: b, c", "a: b, c", "a%3A b%2C c"),
    ("%0A already escaped", "%250A already escaped", "%250A already escaped"),
    ("::error::inner", "::error::inner", "%3A%3Aerror%3A%3Ainner"),
])
def test_workflow_command_escaping(text, data, prop):
    assert escape_data(text) == data
    assert escape_property(text) == prop


def test_a_message_cannot_start_a_second_command():
    line = workflow_command("error", "first\n::warning::injected", file="a,b.yaml", line=3, col=0)
    assert line == "::error file=a%2Cb.yaml,line=3::first%0A::warning::injected"
    assert "\n" not in line


def test_step_outputs_use_a_delimiter_for_multiline_values():
    text = format_outputs({"changes": "true", "count": 3, "body": "line one\nline two"})
    assert text.startswith("changes=true\ncount=3\nbody<<ghadelimiter_")
    delimiter = re.search(r"body<<(\S+)", text).group(1)
    assert text.endswith(f"\nline one\nline two\n{delimiter}\n")
