"""Find a trained model and its tokenizer from one path, for generation.

Accepted paths (checked in this order; ``load_for_generation`` is the one place a new kind plugs in):
  ``model.pt``            a file written by ``attnres_train.train.export`` (``{"model_config", "state_dict"}``);
  ``RUN/checkpoints/step_XXXXXXXX``   a complete training checkpoint (``COMPLETE`` marker), any parallel layout
                          that ``train.export.exported_state`` reads;
  ``RUN`` or ``RUN/checkpoints``      a run directory: its newest complete checkpoint.
The tokenizer is ``--tokenizer`` when given, else the run's ``data.tokenizer`` from ``resolved_config.yaml``,
else the byte tokenizer (which an export file implies: it records no tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from attnres_train.data.config import DataConfigError
from attnres_train.data.tokenizer import ByteTokenizer, HFTokenizer
from attnres_train.model import HybridDecoder, ModelConfigError, build_model
from attnres_train.train.checkpoint import MARKER_NAME, CheckpointError, CheckpointManager
from attnres_train.train.run_state import RESOLVED_CONFIG_NAME

from .sampling import GenerationError


@dataclass
class LoadedModel:
    model: HybridDecoder  # eval mode, on the requested device
    tokenizer: Any  # attnres_train.data.tokenizer.Tokenizer
    source: str  # what was loaded, for messages


def load_for_generation(path: str | Path, device: str | torch.device = "cpu",
                        tokenizer: Optional[str] = None) -> LoadedModel:
    """The model at ``path`` (see the module docstring) and its tokenizer; ``GenerationError`` naming the path
    when it is none of the accepted kinds or its contents do not fit together."""
    path = Path(path)
    if not path.exists():
        raise GenerationError(f"{path}: no such file or directory")
    run_dir: Optional[Path] = None
    if path.is_file():
        model_cfg, state = _read_export_file(path)
        source = f"export file {path}"
    else:
        tag_dir = _checkpoint_tag_dir(path)
        from attnres_train.train.export import exported_state

        try:
            model_cfg, state = exported_state(tag_dir)
        except (CheckpointError, OSError, RuntimeError) as exc:
            raise GenerationError(f"{tag_dir}: cannot read the checkpoint's weights: {exc}") from None
        run_dir = tag_dir.parent.parent
        source = f"checkpoint {tag_dir}"
    model = _build(model_cfg, state, path, device)
    tok = _tokenizer(tokenizer if tokenizer is not None else _run_tokenizer(run_dir))
    if model.config.vocab_size < tok.vocab_size:
        raise GenerationError(
            f"{path}: the model's vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's "
            f"({tok.vocab_size}); pass the tokenizer the model was trained with (--tokenizer)")
    return LoadedModel(model=model, tokenizer=tok, source=source)


def _read_export_file(path: Path) -> tuple[dict, dict]:
    from attnres_train.train.checkpoint import CheckpointError, load_weights_only

    try:
        payload = load_weights_only(path)  # weights-only: a planted pickle payload is refused, not run
    except CheckpointError as exc:
        raise GenerationError(str(exc)) from None
    except Exception as exc:  # a zip/pickle error of any kind means: not a torch file
        raise GenerationError(f"{path}: not a model export (torch.load failed: {type(exc).__name__})") from None
    if not (isinstance(payload, dict) and isinstance(payload.get("model_config"), dict)
            and isinstance(payload.get("state_dict"), dict)):
        raise GenerationError(f"{path}: not a model export (expected a file written by attnres_train.train.export "
                              "holding 'model_config' and 'state_dict')")
    return payload["model_config"], payload["state_dict"]


def _checkpoint_tag_dir(path: Path) -> Path:
    if (path / MARKER_NAME).is_file():
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir():
            latest = CheckpointManager(root, keep_last=0, rank=0, world_size=1, barrier=lambda: None).latest()
            if latest is not None:
                return latest[1]
    raise GenerationError(
        f"{path}: not a checkpoint (expected a model .pt export, a complete checkpoint directory step_XXXXXXXX with "
        f"a {MARKER_NAME} marker, or a run directory holding checkpoints/)")


def _build(model_cfg: dict, state: dict, path: Path, device) -> HybridDecoder:
    try:
        model = build_model(model_cfg, device=device)
    except ModelConfigError as exc:
        raise GenerationError(f"{path}: its model config is invalid: {exc}") from None
    # fp32 parameters; weights saved in bf16 are upcast by the copy.
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        detail = " ".join(str(exc).split())  # one line: torch lists the mismatches on separate lines
        raise GenerationError(f"{path}: weights do not match the model config: {detail[:400]}") from None
    if missing or unexpected:
        raise GenerationError(f"{path}: weights do not match the model config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model.eval()


def _run_tokenizer(run_dir: Optional[Path]) -> str:
    if run_dir is None:
        return "byte"
    config_path = run_dir / RESOLVED_CONFIG_NAME
    try:
        resolved = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError):
        return "byte"
    data = resolved.get("data") if isinstance(resolved, dict) else None
    name = data.get("tokenizer") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name else "byte"


def _tokenizer(name: str):
    if name == "byte":
        return ByteTokenizer()
    try:
        return HFTokenizer(name)
    except DataConfigError as exc:
        raise GenerationError(f"tokenizer {name!r}: {exc}") from None
