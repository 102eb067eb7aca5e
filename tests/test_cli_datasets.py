"""The first real slice through the real CLI: validate -> plan -> apply -> llmops.lock, with DVC."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import dvc_cli

CONFIG = """\
version: 1
project: cli
datasets:
  tickets:
    source: data/tickets.jsonl
    prepare:
      - dedupe: {fields: [question]}
      - filter: {min_chars: {question: 5}}
      - split: {eval_fraction: 0.25, seed: 7}
  notes:
    source: data/notes.csv
"""

ROWS = "".join(json.dumps({"question": f"question number {i}", "answer": f"answer {i}"}) + "\n" for i in range(40))
ROWS += json.dumps({"question": "question number 3", "answer": "dup"}) + "\n" + json.dumps({"question": "hi", "answer": "x"}) + "\n"


@pytest.fixture
def proj(project):
    project.write({"llmops.yaml": CONFIG, "data/tickets.jsonl": ROWS, "data/notes.csv": "question,answer\nwhat,that\n"})
    return project


def test_plan_apply_replan_edit_cycle(proj):
    res = proj.run("plan", "--detailed-exitcode")
    assert res.returncode == 2, res.stderr
    assert "Plan: 2 to create, 0 to replace, 0 to update, 0 to delete." in res.stdout

    res = proj.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Apply complete: 2 applied." in res.stdout
    assert "datasets.notes: train 1 rows" in res.stdout  # one summary line per resource
    lock = proj.read("llmops.lock")
    assert lock.startswith("# llmops.lock: maintained by llmops")
    import yaml

    outputs = yaml.safe_load(lock)["resources"]["datasets.tickets"]["outputs"]
    # 42 rows - 1 duplicate - 1 too short = 40, split about 3:1 by a hash of each row
    assert outputs["train"]["rows"] + outputs["eval"]["rows"] == 40
    assert 4 <= outputs["eval"]["rows"] <= 16

    # DVC agrees that everything is up to date.
    status = dvc_cli(proj.root, "status")
    assert status.returncode == 0 and "up to date" in status.stdout.lower(), status.stdout + status.stderr

    res = proj.run("plan", "--detailed-exitcode")
    assert res.returncode == 0 and "No changes." in res.stdout

    # Same state, same bytes: applying nothing does not touch the lock.
    proj.run("apply", "--auto-approve")
    assert proj.read("llmops.lock") == lock

    proj.write({"data/tickets.jsonl": ROWS + json.dumps({"question": "a brand new one", "answer": "y"}) + "\n"})
    res = proj.run("plan", "--detailed-exitcode", "--refresh=false")
    assert res.returncode == 2
    assert "datasets.tickets  replace" in res.stdout
    assert "source content changed (data/tickets.jsonl)" in res.stdout
    assert "Plan: 0 to create, 1 to replace, 0 to update, 0 to delete." in res.stdout

    res = proj.run("show", "datasets.tickets", "--json")
    row = json.loads(res.stdout)
    assert row["status"] == "changed (replace pending)"
    assert row["profile"]["duplicates_removed"]["exact"] == 1


def test_drift_when_outputs_are_deleted(proj):
    assert proj.run("apply", "--auto-approve").returncode == 0
    proj.path(".llmops/data/tickets/train.jsonl").unlink()
    res = proj.run("plan")
    # DVC's cache still holds the locked content: a checkout, not a rebuild.
    assert "datasets.tickets  restore" in res.stdout and "drift: outputs missing" in res.stdout
    assert "the DVC cache holds the locked content" in res.stdout
    assert "No changes." in proj.run("plan", "--refresh=false").stdout
    res = proj.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "restoring" in res.stdout and proj.path(".llmops/data/tickets/train.jsonl").is_file()
    assert "No changes." in proj.run("plan").stdout
    status = dvc_cli(proj.root, "status")
    assert "up to date" in status.stdout, status.stdout + status.stderr

    # With the cache gone too, nothing holds it: rebuilt, and said so.
    import shutil

    shutil.rmtree(proj.path(".dvc/cache"))
    proj.path(".llmops/data/tickets/train.jsonl").unlink()
    res = proj.run("plan")
    assert "datasets.tickets  replace" in res.stdout
    assert "neither the DVC cache nor a remote holds the locked content: will be rebuilt" in res.stdout


def test_json_markdown_and_saved_plan(proj):
    res = proj.run("plan", "--json")
    data = json.loads(res.stdout)
    assert data["format_version"] == 1
    assert data["summary"] == {"create": 2, "update": 0, "restore": 0, "replace": 0, "delete": 0, "no-op": 0}
    assert [c["address"] for c in data["resource_changes"]] == ["datasets.notes", "datasets.tickets"]
    change = data["resource_changes"][1]
    assert {"address", "action", "reasons", "before", "after"} <= set(change)
    import hashlib

    assert change["after"]["files"] == {"data/tickets.jsonl": hashlib.md5(ROWS.encode()).hexdigest()}

    md = proj.run("plan", "--markdown").stdout
    assert md.startswith("<!-- llmops-plan -->\n## llmops plan: cli")
    assert md.index("**Plan: 2 to create") < md.index("<details>")

    res = proj.run("plan", "--out", "plan.json")
    assert res.returncode == 0 and proj.path("plan.json").exists()
    proj.write({"llmops.yaml": CONFIG.replace("seed: 7", "seed: 8")})
    res = proj.run("apply", "plan.json")
    assert res.returncode == 1
    assert "saved plan is stale" in res.stderr and "run `llmops plan` again" in res.stderr
    assert not proj.path("llmops.lock").exists()  # nothing half-written

    proj.run("plan", "--out", "plan.json")
    res = proj.run("apply", "plan.json")  # a fresh saved plan applies without asking
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Apply complete: 2 applied." in res.stdout


def test_bad_source_data_fails_cleanly(proj):
    proj.write({"data/tickets.jsonl": ROWS + "{not json\n"})
    res = proj.run("apply", "--auto-approve")
    assert res.returncode == 1
    assert "data/tickets.jsonl:43: malformed JSON" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr
    lock = proj.read("llmops.lock")
    assert "datasets.notes" in lock and "datasets.tickets" not in lock


def test_removing_a_dataset_deletes_it_and_protect_blocks_that(proj):
    assert proj.run("apply", "--auto-approve").returncode == 0
    proj.write({"llmops.yaml": CONFIG.replace("  notes:\n    source: data/notes.csv\n", "")})
    res = proj.run("plan")
    assert "datasets.notes  delete" in res.stdout and "removed from llmops.yaml" in res.stdout
    proj.write({"llmops.yaml": CONFIG.replace("source: data/notes.csv", "source: data/notes.csv\n    protect: true")})
    assert proj.run("apply", "--auto-approve").returncode == 0
    proj.write({"llmops.yaml": CONFIG.replace("  notes:\n    source: data/notes.csv\n", "")})
    res = proj.run("plan")
    assert res.returncode == 1
    assert "would delete protected resources: datasets.notes" in res.stderr


def test_graph_output(proj):
    proj.write({"llmops.yaml": CONFIG + """\
prompts:
  p: {text: "{{ question }}", variables: [question]}
base_models:
  m: {build: {architecture: llama, tokenizer_from: tickets}}
finetunes:
  f: {base_model: m, dataset: tickets, prompt: p}
"""})
    mermaid = proj.run("graph").stdout
    assert mermaid.startswith("graph LR")
    assert '["datasets.tickets"]' in mermaid and "-->" in mermaid
    dot = proj.run("graph", "--format", "dot").stdout
    assert '"datasets.tickets" -> "base_models.m";' in dot
    assert '"base_models.m" -> "finetunes.f";' in dot


def test_lock_check_and_hand_edited_lock_is_caught_by_refresh(proj):
    res = proj.run("lock", "--check")
    assert res.returncode == 1 and "llmops.lock does not match llmops.yaml" in res.stderr
    assert proj.run("apply", "--auto-approve").returncode == 0
    res = proj.run("lock", "--check")
    assert res.returncode == 0 and "llmops.lock matches llmops.yaml." in res.stdout

    # A hand edit of the recorded output hash (e.g. in a PR) does not match real state.
    import yaml

    data = yaml.safe_load(proj.read("llmops.lock"))
    recorded = data["resources"]["datasets.tickets"]["outputs"]["train"]["md5"]
    proj.write({"llmops.lock": proj.read("llmops.lock").replace(recorded, "0" * 32)})
    res = proj.run("plan", "--detailed-exitcode")
    assert res.returncode == 2
    assert "datasets.tickets  replace" in res.stdout and "drift: outputs changed on disk" in res.stdout

    # A hand edit of llmops.yaml without apply fails the required status check.
    proj.write({"llmops.yaml": CONFIG.replace("seed: 7", "seed: 9")})
    res = proj.run("lock", "--check")
    assert res.returncode == 1 and "replace  datasets.tickets: prepare" in res.stderr


def test_global_chdir_option(proj, tmp_path):
    import os
    import sys

    res = subprocess.run([sys.executable, "-m", "llmops", "-C", str(proj.root), "validate"],
                         cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ))
    assert res.returncode == 0 and "llmops.yaml is valid: 2 resources." in res.stdout


@pytest.mark.parametrize("args,message", [
    (("plan", "--select", "datasets.tickest"), "unknown resource address 'datasets.tickest'. Did you mean datasets.tickets?"),
    (("apply", "--replace", "finetunes.x"), "unknown resource address 'finetunes.x'"),
    (("show", "datasets.nope"), "no resource 'datasets.nope' in llmops.yaml or llmops.lock"),
    (("apply", "missing-plan.json"), "missing-plan.json: saved plan not found"),
    (("apply", "llmops.yaml"), "not an llmops plan file"),
    (("plan", "--target", "staging"), "unknown target 'staging' (targets: none defined)"),
    (("rollback", "datasets.tickets"), "'datasets.tickets' is not a deployment"),
    (("force-unlock", "abc"), "no apply lock is held for this project"),
])
def test_bad_arguments_get_one_clear_error(proj, args, message):
    res = proj.run(*args)
    assert res.returncode == 1, res.stdout + res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not proj.path("llmops.lock").exists()
