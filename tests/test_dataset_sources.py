"""`datasets.NAME.sources: [A, B, ...]`: several files concatenated with a provenance column,
deduped across files by the existing steps, fingerprinted by every file. Real DVC, real CLI."""

from __future__ import annotations

import json

CONFIG = """\
version: 1
project: sources
datasets:
  joined:
    sources: [data/tickets.jsonl, data/feedback.csv]
    prepare:
      - dedupe: {fields: [question]}
      - split: {eval_fraction: 0.25, seed: 3}
  exact:
    sources: [data/tickets.jsonl, data/tickets-copy.jsonl]
    prepare:
      - dedupe: {}
"""

TICKETS = [{"question": f"Where is order {i}?", "answer": f"It ships on day {i}."} for i in range(12)]
FEEDBACK = "question,answer\nWhere is order 3?,Corrected: it shipped.\nCan I pay by card?,Yes.\n"


def _rows(project, rel: str) -> list[dict]:
    return [json.loads(line) for line in project.read(rel).splitlines()]


def test_sources_are_joined_with_provenance_deduped_across_files_and_each_file_fingerprinted(project):
    project.write({"llmops.yaml": CONFIG,
                   "data/tickets.jsonl": "".join(json.dumps(r) + "\n" for r in TICKETS),
                   "data/tickets-copy.jsonl": "".join(json.dumps(r) + "\n" for r in TICKETS[:4]),
                   "data/feedback.csv": FEEDBACK})
    res = project.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    lock = project.locked()
    joined = lock["datasets.joined"]
    rows = _rows(project, joined["outputs"]["train"]["path"]) + _rows(project, joined["outputs"]["eval"]["path"])
    # 12 tickets + 2 feedback rows, one of them the same question as a ticket: the first wins.
    assert len(rows) == 13
    assert {r["_source"] for r in rows} == {"data/tickets.jsonl", "data/feedback.csv"}
    assert next(r for r in rows if r["question"] == "Where is order 3?")["_source"] == "data/tickets.jsonl"
    assert next(r for r in rows if r["question"] == "Can I pay by card?") == {
        "question": "Can I pay by card?", "answer": "Yes.", "_source": "data/feedback.csv"}
    assert set(joined["inputs"]["sources_md5"]) == {"data/tickets.jsonl", "data/feedback.csv"}
    assert set(joined["files"]) == {"data/tickets.jsonl", "data/feedback.csv"}
    # A whole-row dedupe ignores the provenance: the same record from two files is one.
    exact = _rows(project, lock["datasets.exact"]["outputs"]["train"]["path"])
    assert len(exact) == 12 and {r["_source"] for r in exact} == {"data/tickets.jsonl"}
    profile = json.loads(project.read(joined["outputs"]["profile"]))
    assert profile["sources"] == [{"path": "data/tickets.jsonl", "format": "jsonl", "rows": 12},
                                  {"path": "data/feedback.csv", "format": "csv", "rows": 2}]
    assert project.run("plan", "--detailed-exitcode").returncode == 0

    # A change to any one file replaces the dataset, naming that file.
    project.write({"data/feedback.csv": FEEDBACK + "How do I log in?,Use the app.\n"})
    plan = project.run("plan", "--detailed-exitcode")
    assert plan.returncode == 2, plan.stdout
    change = next(c for c in json.loads(project.run("plan", "--json").stdout)["resource_changes"]
                  if c["address"] == "datasets.joined")
    assert change["action"] == "replace" and any("data/feedback.csv" in r for r in change["reasons"])
    assert next(c for c in json.loads(project.run("plan", "--json").stdout)["resource_changes"]
                if c["address"] == "datasets.exact")["action"] == "no-op"


def test_source_and_sources_are_exclusive_and_every_file_must_exist(project):
    project.write({"llmops.yaml": "version: 1\nproject: s\ndatasets:\n"
                                  "  both: {source: data/a.jsonl, sources: [data/a.jsonl]}\n"
                                  "  gone: {sources: [data/a.jsonl, data/missing.jsonl]}\n",
                   "data/a.jsonl": '{"question": "q"}\n'})
    res = project.run("validate")
    assert res.returncode == 1
    assert "datasets.both: needs exactly one of source, sources (found source, sources)" in res.stderr
    assert "error: datasets.gone.sources.1: file not found: data/missing.jsonl" in res.stderr


def test_provenance_is_not_model_text():
    from llmops.providers.base_models import texts_of_rows

    assert texts_of_rows([{"question": "q", "answer": "a", "_source": "data/x.jsonl"}]) == ["q", "a"]
