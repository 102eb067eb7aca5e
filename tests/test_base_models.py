"""Base models: tiny model build (determinism, loading), path folders, the HF cache, drift."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from llmops.errors import ProviderError
from llmops.engine.lockfile import LockedResource
from llmops.providers.base import ApplyRequest, ProviderContext
from llmops.providers.base_models import BaseModelsProvider, FileHashCache, find_hf_snapshot, model_folder
from llmops.train.build import BOS, EOS, PAD, build_tiny_model

TINY = {
    "architecture": "llama",
    "hidden_size": 32,
    "layers": 2,
    "heads": 4,
    "intermediate_size": 64,
    "vocab_size": 320,
    "max_position_embeddings": 128,
    "tokenizer_from": "tickets",
    "seed": 7,
}
ROWS = [
    {"question": f"How do I reset my password for account {i}?", "answer": f"Open settings, choose reset ({i % 5}).", "n": i}
    for i in range(40)
]
TEXTS = [v for row in ROWS for v in row.values() if isinstance(v, str)]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sha256_tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "tiny"
    build_tiny_model(TINY, TEXTS, out)
    return out


def make_provider(root: Path) -> BaseModelsProvider:
    return BaseModelsProvider(ProviderContext(root=root, state_dir=root / ".llmops", settings={}))


def request(name: str, spec: dict, upstream: dict | None = None) -> ApplyRequest:
    return ApplyRequest(
        address=f"base_models.{name}", name=name, spec=spec, action="create", fingerprint="f" * 64,
        before=None, upstream=upstream or {},
    )


def locked(name: str, result) -> LockedResource:
    return LockedResource(address=f"base_models.{name}", fingerprint="f" * 64, inputs=result.inputs, outputs=result.outputs)


def age(folder: Path, past: float = 1_600_000_000) -> None:
    """Set every mtime to one fixed past time, out of the hash cache's racy window."""
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, (past, past))


def fake_hf_cache(cache: Path, repo_id: str, model_dir: Path, commit: str = COMMIT) -> Path:
    """huggingface_hub's cache layout: blobs/, refs/main, snapshots/COMMIT/* symlinked to blobs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for src in sorted(model_dir.iterdir()):
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        shutil.copyfile(src, repo / "blobs" / digest)
        (snap / src.name).symlink_to(Path("../../blobs") / digest)
    return snap


# --- build ----------------------------------------------------------------------------------


def test_build_is_bit_for_bit_deterministic(tmp_path: Path, built: Path) -> None:
    again = build_tiny_model(TINY, TEXTS, tmp_path / "again")
    assert sha256_tree(tmp_path / "again") == sha256_tree(built) == again["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(again["files"])

    other_seed = build_tiny_model({**TINY, "seed": 8}, TEXTS, tmp_path / "seed8")["files"]
    assert other_seed["model.safetensors"] != again["files"]["model.safetensors"]
    assert other_seed["tokenizer.json"] == again["files"]["tokenizer.json"]  # same texts, same tokenizer

    other_texts = build_tiny_model(TINY, TEXTS[::-1] + ["a brand new sentence"], tmp_path / "texts")["files"]
    assert other_texts["tokenizer.json"] != again["files"]["tokenizer.json"]


PRETRAIN = {**TINY, "pretrain": {"epochs": 12, "learning_rate": 1.0e-2, "batch_size": 2, "warmup_steps": 2}}


def _text_loss(folder: Path, texts: list[str]) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        losses = [float(model(**(ids := tok(t, return_tensors="pt")), labels=ids["input_ids"]).loss) for t in texts]
    return sum(losses) / len(losses)


def test_pretraining_learns_the_texts_and_stays_bit_for_bit_reproducible(tmp_path: Path, built: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    first = build_tiny_model(PRETRAIN, TEXTS, tmp_path / "pre")
    assert torch.get_num_threads() == threads  # the one-thread pin is undone
    stats = first["pretrain"]
    assert 12 <= stats["steps"] <= 12 * len(TEXTS) and stats["tokens"] > 0
    assert stats["last_loss"] < stats["first_loss"]
    # Same spec, same texts: the same bytes, so a second checkout's rebuild verifies.
    again = build_tiny_model(PRETRAIN, TEXTS, tmp_path / "again")
    assert again["files"] == first["files"] == sha256_tree(tmp_path / "pre")
    # The tokenizer is the random build's; the weights are not, and they know the texts better.
    plain = sha256_tree(built)
    assert first["files"]["tokenizer.json"] == plain["tokenizer.json"]
    assert first["files"]["model.safetensors"] != plain["model.safetensors"]
    assert _text_loss(tmp_path / "pre", TEXTS[:8]) < _text_loss(built, TEXTS[:8]) / 2


@pytest.mark.parametrize("pretrain, message", [
    ({"epochs": 0}, "build.pretrain.epochs: must be a positive integer, got 0"),
    ({"learning_rate": 2}, "build.pretrain.learning_rate: must be a number between 0 and 1, got 2"),
    ({"warmup_steps": -1}, "build.pretrain.warmup_steps: must be an integer >= 0, got -1"),
    ({"epoch": 3}, "build.pretrain: unknown field 'epoch'"),
    ("yes", "build.pretrain: must be a mapping"),
])
def test_bad_pretrain_settings_are_refused_before_anything_is_written(tmp_path: Path, pretrain, message) -> None:
    with pytest.raises(ProviderError) as info:
        build_tiny_model({**TINY, "pretrain": pretrain}, TEXTS, tmp_path / "m")
    assert message in info.value.message
    assert not (tmp_path / "m").exists()


def test_built_model_loads_generates_and_round_trips(built: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert model.config.vocab_size == TINY["vocab_size"] >= len(tok)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert json.loads((built / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"

    text = "How do I reset my password? Ünïcode → ok 🙂"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text

    enc = tok(["reset my password", "open settings"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, enc["input_ids"].shape[1] + 4)
    assert int(out.max()) < model.config.vocab_size


@pytest.mark.parametrize(
    "change, texts, needle",
    [
        ({"heads": 5}, TEXTS, "not divisible by heads"),
        ({"vocab_size": 200}, TEXTS, "use at least 259"),
        ({"architecture": "gpt9"}, TEXTS, "architecture 'gpt9' is not supported"),
        ({"layers": 0}, TEXTS, "layers: must be a positive integer"),
        ({}, ["", "   "], "no text"),
    ],
)
def test_build_rejects_bad_specs_without_writing(tmp_path: Path, change: dict, texts: list, needle: str) -> None:
    with pytest.raises(ProviderError, match=needle):
        build_tiny_model({**TINY, **change}, texts, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# --- provider: build ------------------------------------------------------------------------


def test_provider_build_apply_refresh_delete(tmp_path: Path) -> None:
    data = tmp_path / ".llmops" / "data" / "tickets" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    upstream = {
        "datasets.tickets": LockedResource(
            address="datasets.tickets", fingerprint="d" * 64,
            outputs={"train": {"path": ".llmops/data/tickets/train.jsonl", "rows": len(ROWS)}},
        )
    }
    provider = make_provider(tmp_path)
    spec = {"build": dict(TINY)}
    assert provider.content_fingerprint("tiny", spec) is None
    result = provider.apply(request("tiny", spec, upstream))

    folder = tmp_path / ".llmops" / "models" / "tiny"
    assert result.outputs["path"] == ".llmops/models/tiny"
    assert result.outputs["files"] == sha256_tree(folder)
    assert result.inputs["texts"] == len(TEXTS)
    # the provider trained on the dataset's string fields: same files as a direct build
    direct = build_tiny_model(TINY, TEXTS, tmp_path / "direct")
    assert direct["files"] == result.outputs["files"]

    entry = locked("tiny", result)
    assert provider.refresh("tiny", spec, entry) == []
    (folder / "config.json").write_text("{}")
    [drift] = provider.refresh("tiny", spec, entry)
    # a deterministic build is restored by building again, and verified file by file
    assert "changed: config.json" in drift.reason and drift.action == "restore"

    provider.delete("tiny", entry)
    assert not folder.exists()
    [drift] = provider.refresh("tiny", spec, entry)
    assert "missing" in drift.reason and drift.action == "restore"
    restore = dataclasses.replace(request("tiny", spec, upstream), action="restore", before=entry)
    assert provider.restore(restore).outputs["files"] == entry.outputs["files"]
    assert provider.refresh("tiny", spec, entry) == []
    # a lock whose hashes the build cannot reproduce is refused, never silently accepted
    forged = dataclasses.replace(entry, outputs={**entry.outputs, "files": {**entry.outputs["files"],
                                                                            "config.json": "0" * 64}})
    with pytest.raises(ProviderError, match="does not match llmops.lock.*changed: config.json.*--replace"):
        provider.restore(dataclasses.replace(restore, before=forged))


def test_provider_build_needs_the_dataset_lock_entry(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match=r"no entry for datasets\.tickets.*llmops apply"):
        make_provider(tmp_path).apply(request("tiny", {"build": dict(TINY)}))


# --- provider: path -------------------------------------------------------------------------


def test_provider_path_hashes_files_and_detects_changes(tmp_path: Path, built: Path) -> None:
    shutil.copytree(built, tmp_path / "models" / "mine")
    (tmp_path / "models" / "mine" / ".git").mkdir()
    (tmp_path / "models" / "mine" / ".git" / "HEAD").write_text("ref: x")
    age(tmp_path / "models" / "mine")
    provider = make_provider(tmp_path)
    spec = {"path": "models/mine"}

    fp = provider.content_fingerprint("mine", spec)
    result = provider.apply(request("mine", spec))
    assert result.outputs["files"] == sha256_tree(built)  # hidden .git not included
    entry = locked("mine", result)
    assert provider.refresh("mine", spec, entry) == []
    assert provider.content_fingerprint("mine", spec) == fp

    (tmp_path / "models" / "mine" / "extra.txt").write_text("new")
    assert provider.content_fingerprint("mine", spec) != fp
    [drift] = provider.refresh("mine", spec, entry)
    assert "new: extra.txt" in drift.reason

    provider.delete("mine", entry)
    assert (tmp_path / "models" / "mine" / "model.safetensors").exists()  # user folders are never removed

    with pytest.raises(ProviderError, match="path 'models/nope' is not a folder"):
        provider.apply(request("nope", {"path": "models/nope"}))
    with pytest.raises(ProviderError, match="^base_models.nope: path 'models/nope' is not a folder"):
        provider.content_fingerprint("nope", {"path": "models/nope"})  # plan time: names the resource


def test_hash_cache_skips_unchanged_files_and_rereads_changed_ones(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for i in range(3):
        (folder / f"f{i}.bin").write_bytes(bytes([i]) * 1000)
    cache_file = tmp_path / ".llmops" / "cache" / "file-hashes.json"

    fresh = FileHashCache(cache_file)
    fresh.hash_folder(folder)
    fresh.hash_folder(folder)
    assert fresh.files_read == 6  # files written just now are racy: never remembered

    age(folder)
    first = FileHashCache(cache_file)
    hashes = first.hash_folder(folder)
    assert first.files_read == 3 and cache_file.exists()

    second = FileHashCache(cache_file)  # a new process reads the JSON cache
    assert second.hash_folder(folder) == hashes and second.files_read == 0

    (folder / "f1.bin").write_bytes(b"changed")
    age(folder)
    third = FileHashCache(cache_file)
    changed = third.hash_folder(folder)
    assert third.files_read == 1
    assert changed["f1.bin"] == hashlib.sha256(b"changed").hexdigest() != hashes["f1.bin"]


# --- provider: hf ---------------------------------------------------------------------------


def test_provider_hf_resolves_from_the_local_cache(tmp_path: Path, built: Path, monkeypatch) -> None:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    provider = make_provider(tmp_path / "proj")
    spec = {"hf": "acme/tiny-llama", "revision": "main"}
    unresolved = provider.content_fingerprint("llama", spec)

    snap = fake_hf_cache(cache, "acme/tiny-llama", built)
    age(snap.parent.parent / "blobs")
    resolved = provider.content_fingerprint("llama", spec)
    assert resolved != unresolved
    assert provider.content_fingerprint("llama", {"hf": "acme/tiny-llama", "revision": COMMIT}) == resolved

    result = provider.apply(request("llama", spec))
    assert result.outputs["commit"] == result.inputs["commit"] == COMMIT
    assert Path(result.outputs["path"]).resolve() == snap.resolve()
    assert result.outputs["files"] == sha256_tree(built)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.outputs["path"])
    assert model.config.hidden_size == TINY["hidden_size"]

    entry = locked("llama", result)
    assert provider.refresh("llama", spec, entry) == []
    moved = tmp_path / "other-machine-cache"
    shutil.copytree(cache, moved, symlinks=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(moved))  # same commit, cache elsewhere: found by commit
    assert model_folder(tmp_path, entry.outputs, entry.inputs).parent.parent.parent == moved.resolve()
    assert provider.refresh("llama", spec, entry) == []
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    provider.delete("llama", entry)
    assert snap.is_dir()  # the HF cache is never touched
    shutil.rmtree(snap)
    [drift] = provider.refresh("llama", spec, entry)
    assert f"no longer has acme/tiny-llama at commit {COMMIT}" in drift.reason


def test_provider_hf_missing_offline_says_how_to_prefetch(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    provider = make_provider(tmp_path)
    with pytest.raises(ProviderError) as err:
        provider.apply(request("llama", {"hf": "acme/absent", "revision": "v1.0"}))
    message = err.value.message
    assert message.startswith("Hugging Face model acme/absent (revision v1.0) is not in the local cache")
    assert "HF_HUB_OFFLINE=1" in message
    assert "`hf download acme/absent --revision v1.0`" in message
    assert "`huggingface-cli download acme/absent --revision v1.0`" in message
    assert find_hf_snapshot("acme/absent", "v1.0") is None


def test_provider_hf_unknown_revision_in_a_present_cache(tmp_path: Path, built: Path, monkeypatch) -> None:
    cache = tmp_path / "hf-cache"
    fake_hf_cache(cache, "acme/tiny-llama", built)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert find_hf_snapshot("acme/tiny-llama", "main") is not None
    with pytest.raises(ProviderError, match="revision v2"):
        make_provider(tmp_path).apply(request("llama", {"hf": "acme/tiny-llama", "revision": "v2"}))


@pytest.mark.parametrize("spec", [{}, {"hf": "a/b", "path": "x"}])
def test_provider_needs_exactly_one_source(tmp_path: Path, spec: dict) -> None:
    with pytest.raises(ProviderError, match="exactly one of hf, path, build"):
        make_provider(tmp_path).apply(request("bad", spec))
