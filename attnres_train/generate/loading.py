"""Find a trained model and its tokenizer from one path: the loading entry point of ``attnres-generate``,
``attnres-eval`` and the lm-eval model.

Accepted paths (the reading itself is ``attnres_train.interop.pretrained.read_model_source``):
  ``model.pt``            a file written by ``attnres_train.train.export`` (``{"model_config", "state_dict"}``);
  ``RUN/checkpoints/step_XXXXXXXX``   a complete training checkpoint (``COMPLETE`` marker), any parallel layout;
  ``OUT_DIR``             a Hugging Face directory written by ``attnres-export`` (this package's ``attnres`` model
                          type or transformers' native Kimi Linear), or a published Kimi Linear directory;
  ``RUN`` or ``RUN/checkpoints``      a run directory: its newest complete checkpoint.
The tokenizer is ``tokenizer`` when given, else the one the source names (the tokenizer files of a Hugging Face
directory, the run's ``data.tokenizer`` for a checkpoint), else the byte tokenizer for a checkpoint or ``.pt``
file (an export file records no tokenizer). A Hugging Face directory naming no tokenizer is refused.
Parameters are float32 (bfloat16 exports are upcast), on the requested device, in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from attnres_train.model import HybridDecoder
from attnres_train.train.checkpoint import MARKER_NAME, CheckpointManager

from .sampling import GenerationError

DEFAULT_TOKENIZER_OF = {"pt": "byte", "checkpoint": "byte"}  # sources that cannot hold a tokenizer of their own


@dataclass
class LoadedModel:
    model: HybridDecoder  # eval mode, float32, on the requested device
    tokenizer: Any  # attnres_train.data.tokenizer.Tokenizer
    tokenizer_spec: str  # "byte" or what HFTokenizer loaded (a directory or hub name), e.g. for data configs
    source: str  # what was loaded, for messages


def load_for_generation(path: str | Path, device: str | torch.device = "cpu",
                        tokenizer: Optional[str] = None) -> LoadedModel:
    """The model at ``path`` (see the module docstring) and its tokenizer; ``GenerationError`` naming the path
    when it is none of the accepted kinds or its contents do not fit together."""
    from attnres_train.interop.kimi_linear import InteropError
    from attnres_train.interop.pretrained import build_pretrained_model, load_tokenizer, read_model_source

    path = Path(path).expanduser()
    if not path.exists():
        raise GenerationError(f"{path}: no such file or directory")
    if path.is_dir() and not (path / MARKER_NAME).is_file() and not (path / "config.json").is_file():
        path = _newest_checkpoint(path)
    try:
        source = read_model_source(path)
        spec = tokenizer or source.tokenizer or DEFAULT_TOKENIZER_OF.get(source.kind)
        tok = load_tokenizer(spec, path)
    except InteropError as exc:
        raise GenerationError(str(exc)) from None
    if source.model_cfg.vocab_size < tok.vocab_size:
        raise GenerationError(
            f"{path}: the model's vocabulary ({source.model_cfg.vocab_size}) is smaller than the tokenizer's "
            f"({tok.vocab_size}); pass the tokenizer the model was trained with (--tokenizer)")
    source.state = {name: value.float() if value.is_floating_point() else value
                    for name, value in source.state.items()}
    model = build_pretrained_model(source, device).eval()
    return LoadedModel(model=model, tokenizer=tok, tokenizer_spec=spec, source=f"{source.kind} {path}")


def _newest_checkpoint(path: Path) -> Path:
    for root in (path / "checkpoints", path):
        if root.is_dir():
            latest = CheckpointManager(root, keep_last=0, rank=0, world_size=1, barrier=lambda: None).latest()
            if latest is not None:
                return latest[1]
    raise GenerationError(
        f"{path}: not a checkpoint (expected a model .pt export, a complete checkpoint directory step_XXXXXXXX with "
        f"a {MARKER_NAME} marker, a run directory holding checkpoints/, or a Hugging Face directory with config.json)")
