"""Building the typed config sections (model, data, optim) from whatever the caller holds.

Hydra hands over DictConfigs, tests and scripts plain dicts; every section goes through ``section_from_mapping``
so an unknown key fails the same way everywhere: one error naming ``<section>.<key>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def plain_container(value: Any) -> Any:
    """OmegaConf containers -> plain dict / list (resolved); other mappings -> dict; tuples -> lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping) and not isinstance(value, dict):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def section_from_mapping(cls: type[T], cfg: Any, section: str, error: type[Exception]) -> T:
    """A new ``cls`` instance from a ``cls`` instance, a DictConfig or a mapping (not yet validated)."""
    if isinstance(cfg, cls):
        return dataclasses.replace(cfg)
    mapping = plain_container(cfg)
    if not isinstance(mapping, dict):
        raise error(f"{section} config must be a mapping or {cls.__name__}, got {type(cfg).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise error(f"{section}.{unknown[0]}: unknown {section} config key (known keys: {', '.join(sorted(known))})")
    return cls(**mapping)
