"""Plan's digest caches (the skeleton of llmops.yaml, the files each prompt reads): never a
different result, a miss on any changed byte, nothing a planted or corrupt cache file can
inject, and no value of llmops.yaml (a password in a URL) written to disk."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from llmops.engine.planner import make_plan
from llmops.engine.project import open_project

CONFIG = """\
version: 1
project: cached
datasets:
  d: {source: data/d.jsonl}
prompts:
  t: {template: prompts/main.j2, variables: [question]}
  i: {text: "Q: {{ question }}", variables: [question]}
"""


@pytest.fixture()
def cached(project, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    project.write({"llmops.yaml": CONFIG, "data/d.jsonl": '{"question": "q", "answer": "a"}\n',
                   "prompts/main.j2": "{{ question }} {% include 'prompts/part.j2' %}",
                   "prompts/part.j2": "part", "prompts/other.j2": "other"})
    return project


def _plan(root):
    plan = make_plan(open_project(root), refresh=False)
    return {c.address: c.after for c in plan.changes}, plan.config_digest


def _cache(root, name):
    return root / ".llmops" / "cache" / name


def test_cached_plan_equals_uncached_and_follows_includes(cached):
    root = cached.root
    first = _plan(root)
    assert _cache(root, "config-skeleton.json").is_file() and _cache(root, "prompt-files.json").is_file()
    assert first[0]["prompts.t"]["files"].keys() == {"prompts/main.j2", "prompts/part.j2"}
    assert _plan(root) == first  # from the caches
    # Only the included file changes, so that it includes another one: the cached list must go.
    cached.write({"prompts/part.j2": "part {% include 'prompts/other.j2' %}"})
    files = _plan(root)[0]["prompts.t"]["files"]
    assert files.keys() == {"prompts/main.j2", "prompts/part.j2", "prompts/other.j2"}
    # Back as it was, and the uncached path agrees with the cached one byte for byte.
    cached.write({"prompts/part.j2": "part"})
    again = _plan(root)
    for name in ("config-skeleton.json", "prompt-files.json"):
        _cache(root, name).unlink()
    assert _plan(root) == again == first


def test_a_changed_config_is_a_miss(cached):
    root = cached.root
    _plan(root)
    cached.write({"llmops.yaml": CONFIG.replace("Q: {{ question }}", "Question: {{ question }}")})
    after, _ = _plan(root)
    assert after["prompts.i"]["spec"]["text"] == "Question: {{ question }}"


def test_corrupt_cache_is_ignored_and_rewritten(cached):
    root = cached.root
    first = _plan(root)
    for name in ("config-skeleton.json", "prompt-files.json"):
        _cache(root, name).write_bytes(b"\x00garbage{{{")
    assert _plan(root) == first
    for name in ("config-skeleton.json", "prompt-files.json"):
        mac, _, text = _cache(root, name).read_bytes().partition(b"\n")
        assert len(mac) == 64 and json.loads(text)  # rewritten, whole again


def test_planted_cache_injects_nothing(cached, tmp_path, monkeypatch):
    """A CI cache or a pull request can put files in .llmops/cache/: keys are digests anyone
    can compute, so what counts is the HMAC under this user's key."""
    root = cached.root
    first = _plan(root)
    text = _cache(root, "config-skeleton.json").read_bytes().partition(b"\n")[2]
    entries = json.loads(text)
    (key,) = entries
    forged = json.loads(text)
    _respan(forged[key], "Q: {{ question }}", CONFIG.index("prompts/main.j2"), len("prompts/main.j2"))
    files = json.loads(_cache(root, "prompt-files.json").read_bytes().partition(b"\n")[2])
    forged_files = {k: {"deps": {}, "files": ["../../etc/passwd"]} for k in files}
    for name, value in (("config-skeleton.json", forged), ("prompt-files.json", forged_files)):
        body = json.dumps(value).encode()
        # MAC'd under a key that is not this user's (a guess, and plain sha256)
        mac = hmac.new(b"k" * 32, b"llmops-digest-cache\0" + name.encode() + b"\0" + body, hashlib.sha256)
        _cache(root, name).write_bytes(mac.hexdigest().encode() + b"\n" + body)
    assert _plan(root) == first
    _cache(root, "config-skeleton.json").write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    assert _plan(root) == first


def test_values_json_cannot_carry_are_not_cached(cached):
    """A YAML date is a datetime.date: the skeleton keeps its span and parses it again."""
    import datetime

    from llmops.config.document import load_document

    root = cached.root
    (root / "dated.yaml").write_text("when: 2024-01-02\n")
    for _ in range(2):
        doc = load_document(root / "dated.yaml", cache_dir=root / ".llmops" / "cache")
        assert doc.data["when"] == datetime.date(2024, 1, 2)


def test_positions_survive_the_cache(cached):
    """Diagnostics after a cache hit still point at the right line and column."""
    from llmops.errors import ValidationError

    root = cached.root
    bad = CONFIG + "finetunes:\n  f: {base_model: nope, dataset: d, prompt: t}\n"
    cached.write({"llmops.yaml": bad})
    messages = []
    for _ in range(2):
        with pytest.raises(ValidationError) as info:
            open_project(root)
        messages.append([d.format() for d in info.value.diagnostics])
    assert messages[0] == messages[1] and any("llmops.yaml:9:" in m for m in messages[0])


def _respan(node, value, start, length):
    """Point the skeleton's span of the scalar `value` at another part of the text."""
    if node[0] in (0, 1):
        return any(_respan(child, value, start, length) for child in node[3])
    if node[0] == 4 and CONFIG[node[3] + 1:node[4] - 1] == value:
        node[3:5] = [start - 1, start + length + 1]
        return True
    return False


SECRETS = {"db": "Pg-s3cret-881", "remote": "DvcRem0tePw", "plain": "hunter2-plain-token"}
SECRET_CONFIG = f"""\
version: 1
project: secretive
settings:
  dvc_remote: "https://bob:{SECRETS['remote']}@dvc.example.invalid/store"
  registry_uri: postgresql://bob:{SECRETS['db']}@db.example.invalid/registry
datasets:
  d: {{source: data/d.jsonl, description: 'token {SECRETS['plain']}'}}
"""


def test_no_value_of_the_config_reaches_the_cache(cached):
    """The skeleton holds offsets into llmops.yaml, never its values: passwords inside URIs
    stay in the one file they were written in, whatever is cached."""
    from llmops.config.document import load_document, parse_document
    from llmops.config.validate import _cache_dir

    root = cached.root
    cached.write({"llmops.yaml": SECRET_CONFIG})
    cache_dir = _cache_dir(root)
    for _ in range(2):
        doc = load_document(root / "llmops.yaml", cache_dir=cache_dir)
        assert doc.data == parse_document(SECRET_CONFIG, "llmops.yaml").data
        assert doc.data["settings"]["registry_uri"].endswith(f":{SECRETS['db']}@db.example.invalid/registry")
    assert _cache(root, "config-skeleton.json").is_file()
    make_plan(open_project(root), refresh=False)
    written = [p for p in (root / ".llmops").rglob("*") if p.is_file()]
    assert written
    for path in written:
        data = path.read_bytes()
        assert not [what for what, secret in SECRETS.items() if secret.encode() in data], path


def test_every_kind_of_scalar_rebuilds_exactly(cached):
    """Quoted, escaped, folded, block, octal, hex, dates, non-ASCII: what the skeleton gives
    back is the full parse, value and type, with the same positions."""
    import datetime

    from llmops.config.document import _same, load_document, parse_document

    root = cached.root
    text = ("a: 1\nb: [1, 2.5, \"x\", 'y', yes, ~, 012, 0x1F, 1_000, .inf, 2024-01-02, -0.0]\n"
            "c: |\n  block\n  text\nd: >\n  folded\n  more\ne: \"esc\\n\\u00e9\"\nf: 'it''s'\n"
            "g: \"multi\n  line\"\nh: {x: é ü, y: !!str 5, z: \"\"}\n")
    (root / "kinds.yaml").write_text(text, encoding="utf-8")
    full = parse_document(text, "kinds.yaml")
    for _ in range(2):
        doc = load_document(root / "kinds.yaml", cache_dir=root / ".llmops" / "cache")
        assert _same(doc.data, full.data) and doc.positions == full.positions
    assert full.data["b"][6] == 10 and full.data["b"][10] == datetime.date(2024, 1, 2)


@pytest.mark.parametrize("kind,spec", [
    ("finetunes", {"base_model": "m", "dataset": "d", "prompt": "p", "protect": True, "description": "x",
                   "training": {"learning_rate": 0.0002, "epochs": 3}}),
    ("datasets", {"source": "data/d.jsonl", "prepare": [{"split": {"eval_fraction": 0.1, "seed": 1}}]}),
    ("monitors", {"deployment": "d", "store": "postgresql://bob:pw@host/db"}),
    ("prompts", {"text": "Q: {{ question }}", "variables": ["question"], "protect": False}),
])
def test_the_planners_fingerprint_is_the_fingerprint(kind, spec):
    """Plan normalises each spec once and hashes that: the very hash `fingerprint` gives."""
    from llmops.engine.fingerprint import fingerprint, locked_spec
    from llmops.engine.planner import _fingerprint

    files, ups = {"data/d.jsonl": "0" * 32}, {"datasets.d": "sha256:1"}
    for content in (None, "sha256:c"):
        assert _fingerprint(kind, locked_spec(spec, kind), files, ups, content) == fingerprint(
            kind, spec, files, ups, content)


def test_a_cache_of_parsed_values_left_by_an_older_version_is_removed(cached):
    root = cached.root
    stale = _cache(root, "config-parsed.json")
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text('0\n{"k": {"data": {"settings": {"registry_uri": "postgresql://bob:pw@h/db"}}}}')
    _plan(root)
    assert not stale.exists()
