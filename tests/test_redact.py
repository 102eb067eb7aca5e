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
