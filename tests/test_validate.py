"""`llmops validate`: every problem at once, each with file, line, column and a hint."""

from __future__ import annotations

import json

import pytest

from llmops.errors import ValidationError
from llmops.config.validate import load_config

BAD = """\
version: 1
project: t
settings:
  paralelism: 3
datasets:
  a:
    source: data/a.jsonl
    prepare:
      - dedupe: {fields: [q]}
        split: {seed: 1}
  b: {source: data/missing.jsonl}
prompts:
  p: {text: "{{ question }}", variables: [question]}
base_models:
  m: {hf: org/x, build: {architecture: llama, tokenizer_from: a}}
  n: {build: {architecture: llama, tokenizer_from: tickets}}
finetunes:
  f: {base_model: mm, dataset: a, prompt: p, training: {epochs: 1, learning_rat: 3}}
evals:
  e: {model: deployments.d, dataset: a, metrics: [exact_match]}
deployments:
  d: {model: f, gates: [e]}
"""


def diags(project, text):
    project.write({"llmops.yaml": text, "data/a.jsonl": "{}\n"})
    with pytest.raises(ValidationError) as info:
        load_config(project.root)
    return [d.format() for d in info.value.diagnostics]


def test_all_problems_reported_together_with_positions_and_hints(project):
    lines = diags(project, BAD)
    expected = [
        "llmops.yaml:4:3: error: settings.paralelism: unknown key 'paralelism' (hint: did you mean 'parallelism'?)",
        "llmops.yaml:9:9: error: datasets.a.prepare.0: each step has exactly one key; found dedupe, split",
        "llmops.yaml:11:7: error: datasets.b.source: file not found: data/missing.jsonl",
        "llmops.yaml:15:3: error: base_models.m: needs exactly one of hf, path, build (found hf, build)",
        "llmops.yaml:16:36: error: base_models.n.build.tokenizer_from: unknown dataset 'tickets'",
        "llmops.yaml:18:7: error: finetunes.f.base_model: unknown base model 'mm' (hint: did you mean 'm'?)",
        "llmops.yaml:18:68: error: finetunes.f.training.learning_rat: unknown key 'learning_rat' (hint: did you mean 'learning_rate'?)",
        "llmops.yaml:20:3: error: evals.e: dependency cycle: evals.e -> deployments.d -> evals.e",
    ]
    assert len(lines) == len(expected)
    for want, got in zip(expected, lines):
        assert got.startswith(want), (want, got)


def test_yaml_syntax_error_names_line(project):
    lines = diags(project, "version: 1\nproject: t\ndatasets:\n  a: {source: [x\n")
    assert len(lines) == 1 and lines[0].startswith("llmops.yaml:5:1: error: YAML syntax error")


def test_duplicate_keys_are_errors(project):
    lines = diags(project, "version: 1\nproject: t\ndatasets:\n  a: {source: data/a.jsonl}\n  a: {source: data/a.jsonl}\n")
    assert lines == ["llmops.yaml:5:3: error: datasets.a: duplicate key 'a' (first defined on line 4) "
                     "(hint: remove or rename one of them)"]


def test_baseline_is_checked_but_not_a_dependency_edge(project):
    ok = """\
version: 1
project: t
datasets: {a: {source: data/a.jsonl}}
prompts: {p: {text: "{{ question }}", variables: [question]}}
base_models: {m: {build: {architecture: llama, tokenizer_from: a}}}
finetunes: {f: {base_model: m, dataset: a, prompt: p}}
evals: {e: {model: f, dataset: a, metrics: [exact_match], baseline: deployments.d}}
deployments: {d: {model: f, gates: [e]}}
"""
    project.write({"llmops.yaml": ok, "data/a.jsonl": "{}\n"})
    config = load_config(project.root)
    assert config.deps["evals.e"] == ["datasets.a", "finetunes.f"]
    assert config.deps["deployments.d"] == ["finetunes.f", "evals.e"]
    lines = diags(project, ok.replace("baseline: deployments.d", "baseline: deployments.prod"))
    assert lines[0].startswith("llmops.yaml:7:59: error: evals.e.baseline: unknown deployment 'deployments.prod'")


def test_target_overlay_applies_before_validation(project):
    text = """\
version: 1
project: t
settings: {parallelism: 2}
datasets: {a: {source: data/a.jsonl}}
targets:
  prod: {settings: {parallelism: 4, runner: docker}, datasets: {a: {source: data/missing.jsonl}}}
"""
    project.write({"llmops.yaml": text, "data/a.jsonl": "{}\n"})
    assert load_config(project.root).settings["parallelism"] == 2
    with pytest.raises(ValidationError) as info:
        load_config(project.root, target="prod")
    (d,) = info.value.diagnostics
    assert d.line == 6 and "file not found: data/missing.jsonl" in d.summary


def test_cli_validate_exit_codes_and_json(project):
    project.write({"llmops.yaml": BAD, "data/a.jsonl": "{}\n"})
    res = project.run("validate")
    assert res.returncode == 1
    assert "llmops.yaml:4:3: error: settings.paralelism" in res.stderr
    assert res.stderr.strip().endswith("8 errors found.")
    res = project.run("validate", "--json")
    data = json.loads(res.stdout)
    assert res.returncode == 1 and data["valid"] is False and len(data["diagnostics"]) == 8
    assert data["diagnostics"][0]["line"] == 4 and data["diagnostics"][0]["path"] == "settings.paralelism"


def test_missing_config_file_is_one_clear_error(project):
    res = project.run("validate")
    assert res.returncode == 1
    assert "llmops.yaml: file not found. Run `llmops init`" in res.stderr
    assert "Traceback" not in res.stderr


def test_settings_that_do_not_work_together(project):
    text = """\
version: 1
project: t
datasets: {a: {source: data/a.jsonl}}
prompts: {p: {text: "{{ question }}", variables: [question]}}
base_models: {m: {build: {architecture: llama, tokenizer_from: a}}}
finetunes: {f: {base_model: m, dataset: a, prompt: p}}
deployments:
  d: {model: f, serve: {port: 8080, runner: docker}}
monitors:
  d: {drift: {embedding_model: base_model, embedding_max: 0.2}}
  also: {deployment: d}
"""
    lines = diags(project, text)
    assert lines[0].startswith("llmops.yaml:8:17: error: deployments.d.serve: serving with runner docker needs serve.image")
    assert lines[1].startswith("llmops.yaml:10:15: error: monitors.d.drift.embedding_model: embedding drift needs the "
                               "prompt texts, which are only stored with log_text: true")
    assert lines[2].startswith("llmops.yaml:11:10: error: monitors.also.deployment: deployments.d is already watched "
                               "by monitors.d, and a server logs requests to one store (hint: keep one monitor per "
                               "deployment")


BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, needle", [
    (BOMB, "YAML aliases expand too much"),
    ("version: 1\nbase: &b {x: 1}\nother:\n  <<: *b\n", "merge keys (`<<:`) are not supported"),
    ("version: 1\nproject: !foo t\n", "tag '!foo'"),
    ("version: 1\ndatasets:\n  1: {source: x}\n  b: {source: y}\n", "mapping keys must be strings; found 1 (int)"),
    ("version: 1\n1.5: x\n", "found 1.5 (float)"),
    ("a: " + "[" * 150 + "]" * 150 + "\n", "nests deeper than 100 levels"),
])
def test_hostile_yaml_gives_one_clear_diagnostic(project, text, needle):
    lines = diags(project, text)
    assert any(needle in line and line.startswith("llmops.yaml:") for line in lines), lines


CACHED = """\
version: 1
project: t
prompts:
  p:
    template: prompts/main.j2
    variables: [question]
    examples:
      - inputs: {question: hello}
        expect: {contains: "part: fine"}
"""


def _validate(project) -> list[str]:
    try:
        load_config(project.root)
    except ValidationError as exc:
        return [d.format() for d in exc.diagnostics]
    return []


def test_validation_cache_follows_included_templates(project, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    project.write({"llmops.yaml": CACHED, "prompts/main.j2": "{{ question }} {% include 'prompts/part.j2' %}",
                   "prompts/part.j2": "part: fine"})
    assert _validate(project) == []
    assert (project.root / ".llmops/cache/checks.json").is_file()
    assert _validate(project) == []  # from the cache
    project.write({"prompts/part.j2": "part: broken"})  # only the included file changes
    assert any("examples[0]" in line or "part: fine" in line for line in _validate(project))
    project.write({"prompts/part.j2": "part: fine"})
    assert _validate(project) == []


def test_validation_cache_follows_dynamic_includes(project, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    text = CACHED.replace("variables: [question]", "variables: [question]\n    # dynamic include below")
    project.write({"llmops.yaml": text, "prompts/main.j2": "{{ question }} {% include 'prompts/' ~ 'part.j2' %}",
                   "prompts/part.j2": "part: fine"})
    assert _validate(project) == []
    project.write({"prompts/part.j2": "part: changed"})
    assert _validate(project) != []


def test_a_committed_checks_json_is_not_trusted(project, tmp_path, monkeypatch):
    """A pull request can commit .llmops/cache/checks.json: its entries must never count."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    project.write({"llmops.yaml": CACHED, "prompts/main.j2": "{{ question }} no match",
                   "prompts/part.j2": "x"})
    bad = _validate(project)
    assert bad
    cache = project.root / ".llmops/cache/checks.json"
    entries = json.loads(cache.read_text())
    # A planted file saying "no problems" for every key this run wrote, and for keys an
    # attacker would compute without the user's secret (plain sha256 of the inputs):
    forged = {key: {"deps": {}, "diags": []} for key in entries}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-user"))  # the CI runner: another secret
    cache.write_text(json.dumps(forged))
    assert _validate(project) == bad
    key_file = tmp_path / "another-user" / "llmops" / "checks.key"
    assert key_file.stat().st_mode & 0o077 == 0


COMPARE = """\
version: 1
project: t
datasets:
  a: {source: data/a.jsonl}
  b: {source: data/a.jsonl}
prompts:
  p: {text: "{{ question }}", variables: [question]}
base_models:
  m: {build: {architecture: llama, tokenizer_from: a}}
evals:
  base: {model: m, prompt: p, dataset: a, metrics: [rougeL]}
  other: {model: m, prompt: p, dataset: b, metrics: [rougeL]}
  e:
    model: m
    prompt: p
    dataset: a
    metrics: [rougeL, bleu]
    compare_to: {eval: base, min_gain: {rougeL: 0.2, bleu: 0.1, chrf: 0.1}}
  f: {model: m, prompt: p, dataset: a, metrics: [rougeL], compare_to: other}
  g: {model: m, prompt: p, dataset: a, metrics: [rougeL], compare_to: g}
  h: {model: m, prompt: p, dataset: a, metrics: [rougeL], compare_to: nope}
"""


def test_compare_to_names_another_eval_of_the_same_rows_with_the_gained_metrics(project):
    lines = diags(project, COMPARE)
    joined = "\n".join(lines)
    assert ("evals.e.compare_to.min_gain.bleu: gain gate on 'bleu', which evals.base does not compute "
            "(hint: add bleu to evals.base.metrics)") in joined
    assert "evals.e.compare_to.min_gain.chrf: gate on metric 'chrf', which this eval does not compute" in joined
    assert ("evals.f.compare_to: evals.other scores dataset 'b', this eval 'a': their metrics are not comparable"
            in joined)
    assert "evals.g.compare_to: an eval cannot be compared to itself" in joined or "cycle" in joined
    assert "evals.h.compare_to: unknown eval 'nope'" in joined
    assert not any("min_gain.rougeL" in line for line in lines)


def test_compare_to_is_a_dependency(project):
    valid = COMPARE.split("  f:")[0].replace("rougeL: 0.2, bleu: 0.1, chrf: 0.1", "rougeL: 0.2")
    project.write({"llmops.yaml": valid, "data/a.jsonl": "{}\n"})
    config = load_config(project.root)
    assert "evals.base" in config.deps["evals.e"]
