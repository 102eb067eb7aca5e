"""llmops.redact: one policy for every store URL shown to people."""

from __future__ import annotations

import pytest

from llmops.redact import redact_url


@pytest.mark.parametrize("url, shown", [
    ("postgresql://mon:PASSWORD@db:5432/requests", "postgresql://mon:***@db:5432/requests"),
    ("postgresql+psycopg://bob@db/mlflow", "postgresql+psycopg://bob@db/mlflow"),  # no secret in it
    ("https://ghp_token@mlflow.example/x", "https://***@mlflow.example/x"),  # a token as user name
    ("http://alice:s3cret@[::1]:5000/", "http://***@[::1]:5000/"),
    ("s3://bucket/dvc", "s3://bucket/dvc"),
    ("../dvc-remote", "../dvc-remote"),
    ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
    ("http://u:p@host:notaport/", "http://***@host:notaport/"),
])
def test_passwords_and_tokens_never_show(url, shown):
    assert redact_url(url) == shown


def test_spec_redaction_hides_urls_webhooks_and_credential_keys():
    from llmops.redact import redact_spec

    spec = {
        "store": "postgresql://mon:STOREPW@db/requests",
        "webhook": "https://hooks.slack.com/services/T0/B0/SECRETPATH",
        "alerts": [{"webhook": "http://127.0.0.1:9000/hook?token=QUERYSECRET"}],
        "headers": {"api_key": "APIKEY1", "X-Auth-Token": "TOK2", "db-password": "PW3"},
        "auth_token_env": "SERVE_TOKEN",  # the name of a variable, not a secret
        "max_tokens": 64, "tokenizer_from": "tickets", "training": {"lr": 0.1},
    }
    shown = redact_spec(spec)
    assert shown == {
        "store": "postgresql://mon:***@db/requests",
        "webhook": "https://hooks.slack.com/...",
        "alerts": [{"webhook": "http://127.0.0.1:9000/..."}],
        "headers": {"api_key": "***", "X-Auth-Token": "***", "db-password": "***"},
        "auth_token_env": "SERVE_TOKEN",
        "max_tokens": 64, "tokenizer_from": "tickets", "training": {"lr": 0.1},
    }
    assert spec["store"].endswith("STOREPW@db/requests")  # the input is left as it was


def test_every_url_in_a_text_gets_the_same_policy():
    from llmops.redact import redact_urls

    text = ("ERROR: failed to push to 's3://bucket/x' via https://AKIA:sekret@minio:9000/b; "
            "retry postgresql://bob:pw@h/db or ssh://git@host/repo")
    assert redact_urls(text) == ("ERROR: failed to push to 's3://bucket/x' via https://***@minio:9000/b; "
                                 "retry postgresql://bob:***@h/db or ssh://git@host/repo")


def test_store_descriptions_use_the_one_policy():
    from llmops.monitor.postgres import PostgresStore

    store = object.__new__(PostgresStore)  # describe() needs only the URL; no server is contacted
    store.url = "postgresql://bob:pw@h:5432/db?sslmode=require"
    assert store.describe() == "postgresql://bob:***@h:5432/db?sslmode=require"


def test_environment_values_are_masked_longest_first(monkeypatch):
    from llmops.redact import mask_env_values

    monkeypatch.setenv("LLMOPS_T_SHORT", "abc123")  # 6 characters: too short to be a secret
    monkeypatch.setenv("LLMOPS_T_TOKEN", "tok-1234567")
    monkeypatch.setenv("LLMOPS_T_LONGER", "tok-1234567-and-more")
    assert mask_env_values("a tok-1234567-and-more b tok-1234567 c abc123") == "a *** b *** c abc123"
