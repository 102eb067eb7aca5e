"""The suite's prepared MLflow store (tests/conftest.py `prepare_mlflow_store`) is really used:
an apply that would create the embedded store starts from a copy of the prepared one, and
nothing else does. (It once stopped being used without any test failing: the provider
attribute it looked for was renamed.)"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from conftest import prepare_mlflow_store

PROMPTS = "version: 1\nproject: p\nprompts:\n  q: {text: 'Hi {{ question }}', variables: [question]}\n"
DATASETS = "version: 1\nproject: p\ndatasets:\n  d: {source: data/d.jsonl}\n"


def _db(root: Path) -> Path:
    return root / ".llmops" / "mlflow.db"


def test_an_apply_of_a_project_with_mlflow_backed_kinds_gets_the_prepared_store(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    (tmp_path / "llmops.yaml").write_text(PROMPTS)
    for args in (["plan"], ["apply"], ["apply", "--help"]):
        prepare_mlflow_store(tmp_path, args, None)
        assert not _db(tmp_path).exists(), args
    prepare_mlflow_store(tmp_path, ["apply", "--auto-approve"], None)
    with closing(sqlite3.connect(_db(tmp_path))) as conn:
        (location,) = conn.execute("SELECT artifact_location FROM experiments WHERE experiment_id = 0").fetchone()
        assert conn.execute("SELECT COUNT(*) FROM alembic_version").fetchone() == (1,)
    assert location == str(tmp_path.resolve() / "mlruns" / "0")


def test_no_prepared_store_where_the_product_would_not_create_that_store(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    (tmp_path / "llmops.yaml").write_text(DATASETS)  # no kind that opens MLflow before apply
    prepare_mlflow_store(tmp_path, ["apply", "--auto-approve"], None)
    assert not _db(tmp_path).exists()
    (tmp_path / "llmops.yaml").write_text(PROMPTS)
    prepare_mlflow_store(tmp_path, ["apply", "--auto-approve"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert not _db(tmp_path).exists()
