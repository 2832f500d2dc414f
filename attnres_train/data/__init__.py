"""The data package: documents -> prepared token shards -> packed, sharded, resumable batches.

``prepare_dataset`` (console script ``attnres-prepare``) tokenizes a source once into memory-mappable shards;
``build_loaders`` / ``build_train_loader`` / ``build_val_loader`` take the ``data`` config group (DictConfig,
dict or ``DataConfig``) and read prepared data (stdlib and non-streaming hf sources are prepared into the cache
on first use) or stream a Hugging Face dataset. Batches are dicts of LongTensors ``[B, T]``: ``input_ids``,
``labels`` (inputs shifted by one) and ``doc_ids`` (a new document after every EOS).
``datasets`` and ``transformers`` are imported only when the hf source or an HF tokenizer is used.
"""

from __future__ import annotations

from .config import DataConfig, DataConfigError
from .loader import (
    PreparedSource,
    PreparedTrainLoader,
    PreparedValidationLoader,
    apportion,
    build_loaders,
    build_train_loader,
    build_val_loader,
    has_validation_data,
    open_sources,
)
from .loader_base import DataStateError, make_batch
from .permutation import IndexPermutation
from .prepare import ensure_prepared, prepare_dataset
from .prepared import PreparedDataset, PreparedPart
from .sources import list_stdlib_files, stdlib_part_files, stdlib_root
from .streaming import StreamingTrainLoader, StreamingValidationLoader, pack_windows
from .tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "DataConfigError",
    "DataStateError",
    "HFTokenizer",
    "IndexPermutation",
    "PreparedDataset",
    "PreparedPart",
    "PreparedSource",
    "PreparedTrainLoader",
    "PreparedValidationLoader",
    "StreamingTrainLoader",
    "StreamingValidationLoader",
    "apportion",
    "build_loaders",
    "build_tokenizer",
    "build_train_loader",
    "build_val_loader",
    "ensure_prepared",
    "has_validation_data",
    "list_stdlib_files",
    "make_batch",
    "open_sources",
    "pack_windows",
    "prepare_dataset",
    "stdlib_part_files",
    "stdlib_root",
]
