"""Safety metrics over the shipped probe sets, with stub `generate` callables that comply or leak."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from llmops.evals.safety import (PROBES_DIR, SAFETY_METRICS, ProbeSetError, default_render, detect_pii, is_refusal,
                                 load_probe_set, luhn_ok, pii_leak_rate, prompt_injection_resistance, refusal_rate)


def refuse(prompts: list[str]) -> list[str]:
    return ["I'm sorry, but I can't help with that." for _ in prompts]


def echo(prompts: list[str]) -> list[str]:
    """Leaks everything: repeats its whole prompt, system rule and secrets included."""
    return list(prompts)


def obey_user(prompts: list[str]) -> list[str]:
    return ["Sure! Here is what you asked for: " + p.rsplit("User:", 1)[-1] for p in prompts]


@pytest.mark.parametrize("name", ["prompt_injection", "pii", "refusal"])
def test_shipped_probe_sets_are_versioned(name: str):
    path = PROBES_DIR / f"{name}.jsonl"
    header = json.loads(path.read_text().splitlines()[0])
    probes = load_probe_set(name)
    assert probes.version == header["version"] and probes.label == f"{name}/{header['version']}"
    assert probes.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(probes.probes) >= 10 and len({p["id"] for p in probes.probes}) == len(probes.probes)


def test_prompt_injection_resistance():
    score, details, version = prompt_injection_resistance(refuse)
    assert score == 1.0 and version == "prompt_injection/1.0.0"
    assert details["probe_set_sha256"] == load_probe_set("prompt_injection").sha256
    score, details, _ = prompt_injection_resistance(echo)
    assert score == 0.0 and all(r["leaked"] for r in details["results"])
    assert set(details["per_category"]) == {"injection", "jailbreak"}

    def spelled_out(prompts: list[str]) -> list[str]:  # spacing/punctuation tricks still count as leaking
        secrets = [p["forbidden"][0] for p in load_probe_set("prompt_injection").probes]
        return [" ".join(s.lower()) for s in secrets]

    assert prompt_injection_resistance(spelled_out)[0] == 0.0


def test_injection_resistance_counts_partial_leaks():
    probes = load_probe_set("prompt_injection").probes
    leak_first = {p["id"] for p in probes[:3]}

    def generate(prompts: list[str]) -> list[str]:
        return [probes[i]["forbidden"][0] if probes[i]["id"] in leak_first else "No." for i in range(len(prompts))]

    score, details, _ = prompt_injection_resistance(generate)
    assert score == pytest.approx(1 - 3 / len(probes))
    assert {r["id"] for r in details["results"] if not r["resisted"]} == leak_first


def test_pii_leak_rate():
    assert pii_leak_rate(refuse)[0] == 0.0
    score, details, version = pii_leak_rate(echo)
    assert score == 1.0 and version == "pii/1.0.0"
    assert details["responses_by_detector"] == {"email": 15, "phone": 15, "card": 15}
    assert pii_leak_rate(obey_user)[0] == 0.0  # repeating the question is no leak


@pytest.mark.parametrize("text, kinds", [
    ("write to jane.doe@example.com", {"email"}),
    ("call +1 415-555-0132 or (212) 555-0199", {"phone"}),
    ("card 4111 1111 1111 1111", {"card"}),
    ("card 4111-1111-1111-1112", set()),  # fails the Luhn check, and is no phone number either
    ("order 12345 shipped 2024-01-15, total $129.99", set()),
])
def test_pii_detectors(text: str, kinds: set):
    assert set(detect_pii(text)) == kinds


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("340000000000009") and not luhn_ok("4111111111111112")


def test_refusal_rate():
    score, details, version = refusal_rate(refuse)
    assert score == 1.0 and version == "refusal/1.0.0" and details["probes"] == len(details["results"])
    assert refusal_rate(obey_user)[0] == 0.0
    assert is_refusal("I cannot do that.") and is_refusal("I won’t help with this")
    assert not is_refusal("Sure, here's a recipe for pancakes.")


def test_render_is_used_and_generate_must_answer_every_prompt():
    seen: list[str] = []

    def generate(prompts: list[str]) -> list[str]:
        seen.extend(prompts)
        return ["no"] * len(prompts)

    refusal_rate(generate, render=lambda system, user: f"<s>{system}|{user}</s>")
    assert seen and all(re.fullmatch(r"<s>.*\|.*</s>", p, re.S) for p in seen)
    assert default_render("", "hi") == "User: hi\nAssistant:"
    with pytest.raises(Exception, match="one text per prompt"):
        refusal_rate(lambda prompts: ["only one"])


def test_probe_set_versions_and_errors(tmp_path: Path):
    no_version = tmp_path / "custom.jsonl"
    no_version.write_text('{"id": "a", "user": "hello"}\n')
    with pytest.raises(ProbeSetError, match="no version"):
        load_probe_set(no_version)
    (tmp_path / "custom.version.json").write_text('{"version": "2.1"}')
    assert load_probe_set(no_version).label == "custom/2.1"  # sidecar
    with pytest.raises(ProbeSetError, match="shipped sets: pii, prompt_injection, refusal"):
        load_probe_set("nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"version": "1"}\n{"id": "x"}\n')
    with pytest.raises(ProbeSetError, match="probe 1 needs"):
        load_probe_set(bad)


def test_registry_lists_directions():
    assert {k: v[1] for k, v in SAFETY_METRICS.items()} == {
        "prompt_injection_resistance": True, "pii_leak_rate": False, "refusal_rate": True}
