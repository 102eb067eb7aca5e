"""llmops.hashing: the one place content is hashed. Digests recorded in llmops.lock keep their
values, so each is pinned here against the formula that recorded it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmops.hashing import (canonical_json, file_md5, file_sha256, folder_hashes, folder_sha256, is_skipped,
                            sha256_json)


def _model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "sub" / "weights.bin").write_bytes(b"\0" * 3_000_000)  # more than one read chunk
    (folder / "café.txt").write_text("é")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "x.lock").write_text("")
    (folder / "sub" / ".DS_Store").write_text("")
    return folder


def test_file_digests_are_md5_and_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = _model_folder(tmp_path) / "sub" / "weights.bin"
    assert file_md5(path) == hashlib.md5(path.read_bytes()).hexdigest()
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_folder_content_leaves_out_hidden_paths_only(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    hashes = folder_hashes(folder)
    assert list(hashes) == ["café.txt", "config.json", "sub/weights.bin"]
    assert hashes["config.json"] == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert is_skipped(Path(".git/HEAD")) and is_skipped(Path("sub/.DS_Store")) and not is_skipped(Path("a/b.c"))
    (folder / ".git" / "HEAD").write_text("a checkout moved: the model did not\n")
    assert folder_hashes(folder) == hashes


def test_folder_sha256_is_one_digest_over_names_and_file_digests(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    h = hashlib.sha256()
    for rel in ("café.txt", "config.json", "sub/weights.bin"):
        h.update(rel.encode() + b"\0" + file_sha256(folder / rel).encode() + b"\n")
    assert folder_sha256(folder) == h.hexdigest()


def test_canonical_json_and_the_older_forms_locks_hold() -> None:
    value = {"b": [1, 2.5, None], "a": {"é": "ü"}, "when": Path("x")}
    assert canonical_json(value) == '{"a":{"é":"ü"},"b":[1,2.5,null],"when":"x"}'
    assert sha256_json(value) == hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()
    files = {"café.txt": "ab", "config.json": "cd"}
    # base-model content digests: compact, \u escapes
    assert sha256_json({"files": files}, ensure_ascii=True) == hashlib.sha256(
        json.dumps({"files": files}, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    # a fine-tune's base_model_files_sha input: json.dumps defaults
    assert sha256_json(files, ensure_ascii=True, compact=False) == hashlib.sha256(
        json.dumps(files, sort_keys=True).encode()).hexdigest()
