"""The data package: documents -> tokens -> packed, sharded, resumable batches.

``build_tokenizer(cfg)`` and ``build_train_loader`` / ``build_val_loader`` / ``build_loaders`` take the
``data`` config group (DictConfig, dict or ``DataConfig``). Batches are dicts of LongTensors ``[B, T]``:
``input_ids``, ``labels`` (inputs shifted by one) and ``doc_ids`` (a new document after every EOS).
``datasets`` and ``transformers`` are imported only when the hf source or an HF tokenizer is used.
"""

from __future__ import annotations

from .config import DataConfig, DataConfigError
from .loader import (
    DataStateError,
    PackedTrainLoader,
    PackedValidationLoader,
    StreamingTrainLoader,
    StreamingValidationLoader,
    TokenCorpus,
    build_loaders,
    build_token_corpus,
    build_train_loader,
    build_val_loader,
    has_validation_data,
    make_batch,
    pack_windows,
)
from .sources import list_stdlib_files, stdlib_part_files, stdlib_root
from .tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "DataConfigError",
    "DataStateError",
    "HFTokenizer",
    "PackedTrainLoader",
    "PackedValidationLoader",
    "StreamingTrainLoader",
    "StreamingValidationLoader",
    "TokenCorpus",
    "build_loaders",
    "build_token_corpus",
    "build_tokenizer",
    "build_train_loader",
    "build_val_loader",
    "has_validation_data",
    "list_stdlib_files",
    "make_batch",
    "pack_windows",
    "stdlib_part_files",
    "stdlib_root",
]
