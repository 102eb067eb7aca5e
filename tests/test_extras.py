"""llmops.integrations.extras: which optional package a store URL needs, and the refusal naming the extra."""

from __future__ import annotations

import importlib.util

import pytest

from llmops.integrations import extras
from llmops.errors import LlmopsError
from llmops.integrations.extras import DVC_REMOTE, MLFLOW_ARTIFACTS, MONITOR_STORE, require_store_support

_real_find_spec = importlib.util.find_spec


@pytest.fixture
def missing(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Modules (and their submodules) that `find_spec` reports absent; add names to it."""
    absent: set[str] = set()

    def find_spec(name: str, package: str | None = None):
        if any(name == m or name.startswith(m + ".") for m in absent):
            return None
        return _real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return absent


# url, purpose, missing module, expected fragments of the message (None: no error)
CASES = [
    ("s3://bucket/x", DVC_REMOTE, "dvc_s3",
     ["settings.dvc_remote s3://bucket/x needs the `s3` extra (dvc-s3) which is not installed",
      "pip install 'llmops-gitops[s3]'"]),
    ("S3://bucket/x", DVC_REMOTE, "dvc_s3", ["`s3` extra (dvc-s3)"]),
    ("s3://bucket/x", DVC_REMOTE, "boto3", None),  # DVC reads S3 through dvc-s3, not boto3 directly
    ("s3://bucket/mlflow", MLFLOW_ARTIFACTS, "boto3", ["the MLflow artifact location", "`s3` extra (boto3)"]),
    ("s3://bucket/mlflow", MLFLOW_ARTIFACTS, "dvc_s3", None),
    ("gs://bucket/x", DVC_REMOTE, "dvc_gs", ["`gcs` extra (dvc-gs)", "pip install 'llmops-gitops[gcs]'"]),
    ("gs://bucket/x", MLFLOW_ARTIFACTS, "google.cloud.storage", ["`gcs` extra (google-cloud-storage)"]),
    ("gs://bucket/x", MLFLOW_ARTIFACTS, "google", ["`gcs` extra"]),  # the parent package is missing
    ("azure://container/x", DVC_REMOTE, "dvc_azure", ["`azure` extra (dvc-azure)"]),
    ("wasbs://c@acct.blob.core.windows.net/x", MLFLOW_ARTIFACTS, "azure.storage.blob",
     ["`azure` extra (azure-storage-blob)", "pip install 'llmops-gitops[azure]'"]),
    ("postgresql://mon:SECRET@db:5432/requests", MONITOR_STORE, "psycopg",
     ["the monitor store postgresql://mon:***@db:5432/requests needs the `postgres` extra (psycopg[binary])"]),
    ("postgresql+psycopg://db/requests", MONITOR_STORE, "psycopg", ["`postgres` extra"]),
    ("/mnt/remote", DVC_REMOTE, "dvc_s3", None),  # local paths need nothing optional
    ("http://127.0.0.1:5000", MLFLOW_ARTIFACTS, "boto3", None),
    ("sqlite:///.llmops/requests.db", MONITOR_STORE, "psycopg", None),
]


@pytest.mark.parametrize("url, purpose, absent, expected", CASES)
def test_require_store_support(missing, url, purpose, absent, expected):
    missing.add(absent)
    if expected is None:
        require_store_support(url, purpose)
        return
    with pytest.raises(LlmopsError) as err:
        require_store_support(url, purpose)
    for fragment in expected:
        assert fragment in err.value.message
    assert "SECRET" not in err.value.message


def test_installed_packages_pass(missing):
    # Nothing reported missing: whatever is installed passes; a stdlib-backed check never raises.
    require_store_support("sqlite:///x.db", MONITOR_STORE)
    if importlib.util.find_spec("dvc_s3") is not None:  # installed with the dev extra
        require_store_support("s3://bucket/x", DVC_REMOTE)


def test_where_names_the_setting(missing):
    missing.add("psycopg")
    with pytest.raises(LlmopsError, match=r"^monitors\.quality\.store postgresql://h/db needs"):
        require_store_support("postgresql://h/db", MONITOR_STORE, where="monitors.quality.store")


def test_unknown_purpose_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown store purpose 'tracking'"):
        require_store_support("s3://b/x", "tracking")


@pytest.mark.parametrize("module, importable", [
    ("json", True),
    ("llmops.integrations.extras", True),
    ("llmops_no_such_package", False),
    ("llmops_no_such_package.sub", False),  # find_spec raises for a missing parent: still False
])
def test_is_importable_uses_the_real_finder(module, importable):
    assert extras.is_importable(module) is importable
