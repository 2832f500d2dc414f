"""Register ``AttnResConfig`` / ``AttnResForCausalLM`` with transformers' Auto classes, without importing
transformers.

``import attnres_train`` must stay cheap (transformers' modeling code takes seconds to import), yet after it
``AutoModelForCausalLM.from_pretrained(DIR)`` must know ``model_type: attnres``. So registration waits for
transformers' own Auto modules: when ``transformers.models.auto.configuration_auto`` has been imported the config
class is registered, when ``...modeling_auto`` has been, the model class. Modules already imported are
registered at once. Only those two module names are watched; every other import passes through untouched.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"


def _register(module_name: str) -> None:
    if module_name == _CONFIG_AUTO:
        from .hf_config import MODEL_TYPE, AttnResConfig

        sys.modules[_CONFIG_AUTO].AutoConfig.register(MODEL_TYPE, AttnResConfig, exist_ok=True)
    elif module_name == _MODELING_AUTO:
        from .hf_config import AttnResConfig
        from .hf_model import AttnResForCausalLM

        sys.modules[_MODELING_AUTO].AutoModelForCausalLM.register(AttnResConfig, AttnResForCausalLM, exist_ok=True)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it asks the other finders for a watched module and makes its loader register the
    Auto classes right after the module has executed."""

    def find_spec(self, name: str, path: Any, target: Any = None):
        if name not in (_CONFIG_AUTO, _MODELING_AUTO):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_and_register(module):
            execute(module)
            _register(name)

        loader.exec_module = exec_and_register  # this loader object serves this one module only
        return spec


def register_with_transformers() -> None:
    """Idempotent; safe whether or not transformers is installed or already imported."""
    for name in (_CONFIG_AUTO, _MODELING_AUTO):
        if name in sys.modules:
            _register(name)
    if not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
