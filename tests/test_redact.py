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
