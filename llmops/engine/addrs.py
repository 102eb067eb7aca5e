"""Resource addresses (`kind.name`) and the one list of resource kinds.

A kind's schema entry (`$defs.<kind without its s>`) and its provider
(`llmops.providers.<kind>`) are found from its name here. Kinds appear in this order in llmops.yaml, in plans and in the lock; the order is also the
tie-breaker that keeps plans deterministic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmops.errors import LlmopsError

KINDS: tuple[str, ...] = (
    "datasets",
    "prompts",
    "base_models",
    "finetunes",
    "evals",
    "deployments",
    "monitors",
)
KIND_ORDER = {k: i for i, k in enumerate(KINDS)}

# The name pattern of every resource (llmops/schemas/llmops.schema.json `propertyNames`). Names
# become folder names under .llmops/, so anything that reads an address from a file the
# user does not control (the lock) checks it against this before using it.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
NAME_MAX_LENGTH = 100
_NAME_RE = re.compile(NAME_PATTERN)


@dataclass(frozen=True, order=True)
class Address:
    """A resource address; ordering follows KINDS, then name."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}.{self.name}"

    @property
    def sort_key(self) -> tuple[int, str]:
        return (KIND_ORDER.get(self.kind, len(KINDS)), self.name)


def parse_address(text: str) -> Address:
    kind, sep, name = text.partition(".")
    if not sep or not name or kind not in KIND_ORDER:
        raise LlmopsError(
            f"'{text}' is not a resource address; use KIND.NAME with KIND one of {', '.join(KINDS)} "
            "(e.g. finetunes.support-lora)."
        )
    return Address(kind, name)


def sort_addresses(addrs) -> list[str]:
    """Sort address strings by kind order, then name."""
    return sorted(addrs, key=lambda a: address_sort_key(a))


def address_sort_key(addr: str) -> tuple[int, str]:
    kind, _, name = addr.partition(".")
    return (KIND_ORDER.get(kind, len(KINDS)), name)


def address_problem(text: object) -> str | None:
    """Why `text` is not a valid `KIND.NAME` address (None when it is one).

    Stricter than `parse_address`: the name must match NAME_PATTERN, so an address can
    never name a path outside its kind's folder (`..`, `/`, `\\`, NUL are refused).
    """
    if not isinstance(text, str):
        return f"an address must be a string, found {type(text).__name__}"
    kind, sep, name = text.partition(".")
    if not sep or kind not in KIND_ORDER:
        return f"the kind must be one of {', '.join(KINDS)}"
    if len(name) > NAME_MAX_LENGTH or not _NAME_RE.fullmatch(name):
        return (f"the name must match {NAME_PATTERN} (lowercase letters, digits, '-' and '_', "
                f"at most {NAME_MAX_LENGTH} characters)")
    return None
