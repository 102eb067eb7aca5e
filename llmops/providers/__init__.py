"""Providers: one module per resource kind; each plans, applies, refreshes and deletes it.

Modules are imported lazily by `provider_class`, so `llmops validate` never pays for them.
"""

from __future__ import annotations

import importlib

from llmops.providers.base import Provider

_PROVIDERS: dict[str, tuple[str, str]] = {
    "datasets": ("llmops.providers.datasets", "DatasetsProvider"),
    "prompts": ("llmops.providers.prompts", "PromptsProvider"),
    "base_models": ("llmops.providers.base_models", "BaseModelsProvider"),
    "finetunes": ("llmops.providers.finetunes", "FinetunesProvider"),
    "evals": ("llmops.providers.evals", "EvalsProvider"),
    "deployments": ("llmops.providers.deployments", "DeploymentsProvider"),
    "monitors": ("llmops.providers.monitors", "MonitorsProvider"),
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
