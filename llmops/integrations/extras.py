"""Optional packages that a store URL needs, and the refusal that names the extra to install.

`require_store_support(url, purpose)` raises `LlmopsError` when the URL's scheme needs a
package of an optional extra (pyproject.toml's `s3`, `gcs`, `azure`, `postgres`) that is not
importable, e.g. a DVC remote on `s3://` without dvc-s3. Which package depends on who reads
the URL: DVC reads remotes through its plugin (`dvc_s3`), MLflow reads artifacts through the
cloud SDK (`boto3`), the monitor reads its request store through `psycopg`.

Only the standard library is imported: packages are looked up with
`importlib.util.find_spec`, never imported. URLs in messages carry no password.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from urllib.parse import urlsplit

from llmops.errors import LlmopsError
from llmops.redact import redact_url

DVC_REMOTE = "dvc_remote"
MLFLOW_ARTIFACTS = "mlflow_artifacts"
MONITOR_STORE = "monitor_store"

# What each purpose is called in messages when the caller does not say where the URL came from.
_WHERE = {
    DVC_REMOTE: "settings.dvc_remote",
    MLFLOW_ARTIFACTS: "the MLflow artifact location",
    MONITOR_STORE: "the monitor store",
}


@dataclass(frozen=True)
class Requirement:
    """The importable `module` that reading a URL needs, from `distribution` of llmops' `extra`."""

    module: str
    extra: str
    distribution: str


_S3_DVC = Requirement("dvc_s3", "s3", "dvc-s3")
_GS_DVC = Requirement("dvc_gs", "gcs", "dvc-gs")
_AZURE_DVC = Requirement("dvc_azure", "azure", "dvc-azure")
_S3_SDK = Requirement("boto3", "s3", "boto3")
_GS_SDK = Requirement("google.cloud.storage", "gcs", "google-cloud-storage")
_AZURE_SDK = Requirement("azure.storage.blob", "azure", "azure-storage-blob")
_PSYCOPG = Requirement("psycopg", "postgres", "psycopg[binary]")

# purpose -> URL scheme -> requirement. A scheme not listed needs nothing optional.
REQUIREMENTS: dict[str, dict[str, Requirement]] = {
    DVC_REMOTE: {"s3": _S3_DVC, "gs": _GS_DVC, "azure": _AZURE_DVC},
    MLFLOW_ARTIFACTS: {"s3": _S3_SDK, "gs": _GS_SDK, "wasbs": _AZURE_SDK, "azure": _AZURE_SDK},
    MONITOR_STORE: {"postgresql": _PSYCOPG, "postgres": _PSYCOPG, "postgresql+psycopg": _PSYCOPG},
}


def store_requirement(url: str, purpose: str) -> Requirement | None:
    """The optional requirement of `url` read for `purpose` (one of `REQUIREMENTS`), if any."""
    try:
        by_scheme = REQUIREMENTS[purpose]
    except KeyError:
        raise ValueError(f"unknown store purpose {purpose!r}; expected one of {sorted(REQUIREMENTS)}") from None
    if "://" not in url:
        return None  # a local path
    return by_scheme.get(urlsplit(url).scheme.lower())


def is_importable(module: str) -> bool:
    """Whether `module` can be imported, without importing it (parents of a dotted name are)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a broken __spec__
        return False


def require_store_support(url: str, purpose: str, where: str | None = None) -> None:
    """Raise `LlmopsError` naming the extra to install when `url`, read for `purpose`
    (`DVC_REMOTE`, `MLFLOW_ARTIFACTS`, `MONITOR_STORE`), needs a package that is missing.
    `where` names the URL's origin in the message (default: the purpose's usual setting)."""
    requirement = store_requirement(url, purpose)
    if requirement is None or is_importable(requirement.module):
        return
    label = where or _WHERE[purpose]
    raise LlmopsError(
        f"{label} {redact_url(url)} needs the `{requirement.extra}` extra ({requirement.distribution}) "
        f"which is not installed; run `pip install 'llmops-gitops[{requirement.extra}]'` "
        f"(or `pip install '{requirement.distribution}'`)."
    )
