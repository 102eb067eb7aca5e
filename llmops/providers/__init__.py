"""Providers: one module per resource kind; each plans, applies, refreshes and deletes it.

Modules are imported lazily by `provider_class`, so `llmops validate` never pays for them.
"""

from __future__ import annotations

import importlib

from llmops.engine.addrs import KINDS
from llmops.providers.base import Provider

# One module per kind, llmops/providers/<kind>.py, holding <Kind>Provider (base_models ->
# BaseModelsProvider): a new kind needs its name in llmops.engine.addrs.KINDS, its schema and
# its module, and no table here.
_PROVIDERS: dict[str, tuple[str, str]] = {
    kind: (f"llmops.providers.{kind}", "".join(word.title() for word in kind.split("_")) + "Provider")
    for kind in KINDS
}


def provider_class(kind: str) -> type[Provider] | None:
    """The provider class for a kind, or None while that kind has no provider yet."""
    entry = _PROVIDERS.get(kind)
    if entry is None:
        return None
    module_name, class_name = entry
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    return getattr(module, class_name, None)
