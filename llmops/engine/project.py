"""A project on disk: its folder, validated config, lock, state folder and providers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llmops.config.document import CONFIG_NAME
from llmops.engine.lockfile import Lock, load_lock, lock_path
from llmops.providers import provider_class
from llmops.providers.base import Provider, ProviderContext
from llmops.config.validate import Config, load_config

STATE_DIR = ".llmops"


@dataclass
class Project:
    root: Path
    config: Config
    lock: Lock
    log: Callable[[str, str], None] = lambda address, message: None
    providers: dict[str, Provider | None] = field(default_factory=dict)
    options: dict[str, object] = field(default_factory=dict)  # run options (e.g. approved_by)
    # Tests can substitute providers per kind (a dict kind -> Provider class).
    provider_overrides: dict[str, type[Provider]] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def lock_path(self) -> Path:
        return lock_path(self.root)

    def reload_lock(self) -> None:
        """Read llmops.lock again: what the project opened with may predate an apply that held
        the apply lock meanwhile (call it once the apply lock is held)."""
        self.lock = load_lock(self.lock_path)

    def context(self) -> ProviderContext:
        return ProviderContext(
            root=self.root,
            state_dir=self.state_dir,
            settings=self.config.settings,
            config=self.config.data,
            log=lambda address, message: self.log(address, message),
            target=self.config.target,
            options=self.options,
            locked=lambda address: self.lock.get(address),
        )

    def provider(self, kind: str) -> Provider | None:
        if kind not in self.providers:
            cls = self.provider_overrides.get(kind) or provider_class(kind)
            self.providers[kind] = cls(self.context()) if cls else None
        return self.providers[kind]


def open_project(
    root: Path,
    target: str | None = None,
    config_name: str = CONFIG_NAME,
    provider_overrides: dict[str, type[Provider]] | None = None,
) -> Project:
    """Load and validate llmops.yaml and llmops.lock of the project at `root`."""
    root = root.resolve()
    config = load_config(root, target=target, config_name=config_name)
    lock = load_lock(lock_path(root))
    return Project(root=root, config=config, lock=lock, provider_overrides=dict(provider_overrides or {}))
