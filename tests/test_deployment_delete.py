"""Deleting a deployment that a lock names only unsets an alias llmops set: the lock is content
a pull request can write (`deployments.x: {outputs: {model_name: theirs, alias: production}}`
plans a delete), and it must not unset another model's alias. Real MLflow registry on SQLite."""

from __future__ import annotations

import os

from llmops.providers.deployments import _delete_alias


def test_only_the_alias_of_the_version_this_deployment_promoted_is_removed(tmp_path):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (tmp_path / "src").mkdir()
    client.create_registered_model("theirs")
    theirs = client.create_model_version("theirs", source=str(tmp_path / "src"))  # not registered by llmops
    client.set_registered_model_alias("theirs", "production", theirs.version)
    client.create_registered_model("ours")
    v1 = client.create_model_version("ours", source=str(tmp_path / "src"), tags={"llmops.fingerprint": "sha256:a"})
    v2 = client.create_model_version("ours", source=str(tmp_path / "src"), tags={"llmops.fingerprint": "sha256:b"})
    client.set_registered_model_alias("ours", "production", v2.version)
    said: list[str] = []

    _delete_alias(client, "theirs", "production", theirs.version, said.append)  # a crafted lock
    assert client.get_model_version_by_alias("theirs", "production").version == theirs.version
    _delete_alias(client, "ours", "production", v1.version, said.append)  # moved on since: not ours to unset
    assert client.get_model_version_by_alias("ours", "production").version == v2.version
    assert len(said) == 2 and "left alias production of theirs in place" in said[0]
    _delete_alias(client, "ours", "production", v2.version, said.append)
    assert client.get_registered_model("ours").aliases == {}
    _delete_alias(client, "ours", "production", v2.version, said.append)  # already gone: nothing to do
    assert len(said) == 2
