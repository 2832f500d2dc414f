"""Where documents come from, and which of them are training or validation data.

* ``stdlib``: the ``*.py`` files of the running interpreter's standard library (``site-packages`` excluded),
  sorted by relative path. A file is validation data when a hash of its relative path falls below
  ``validation_fraction``: deterministic, disjoint, and stable when files are added or removed.
* ``hf``: ``datasets.load_dataset`` by hub name, local directory, local file or ``data_files``. Without a
  validation split, a document is held out when a hash of its text falls below ``validation_fraction``, which
  is independent of order, shuffling and streaming (duplicates always land on the same side).

``datasets`` is imported only for the hf source.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .config import DataConfig, DataConfigError, flatten_data_files, infer_builder
from .tokenizer import looks_like_local_path

TRAIN = "train"
VALIDATION = "validation"
PARTS = (TRAIN, VALIDATION)
_SKIPPED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def hash_fraction(key: str) -> float:
    """A stable pseudo-uniform number in [0, 1) for ``key`` (same on every machine and Python run)."""
    digest = hashlib.blake2b(key.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_held_out(key: str, validation_fraction: float) -> bool:
    """Whether the document keyed by ``key`` belongs to the validation part."""
    return hash_fraction(key) < validation_fraction


def check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"part={part!r}: expected one of {PARTS}")


# ----------------------------------------------------------------------------------------------------
# stdlib
# ----------------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(root: Optional[Path] = None) -> list[str]:
    """Relative POSIX paths of every ``*.py`` under the stdlib directory (site-packages excluded), sorted."""
    root = Path(root) if root is not None else stdlib_root()
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]
        relative_dir = Path(directory).relative_to(root)
        found.extend((relative_dir / name).as_posix() for name in files if name.endswith(".py"))
    return sorted(found)


def stdlib_part_files(
    part: str, validation_fraction: float, max_documents: Optional[int] = None, root: Optional[Path] = None
) -> list[str]:
    """The relative paths of one part (train / validation), in sorted order, capped at ``max_documents``."""
    check_part(part)
    want_validation = part == VALIDATION
    chosen = [f for f in list_stdlib_files(root) if is_held_out(f, validation_fraction) == want_validation]
    return chosen if max_documents is None else chosen[:max_documents]


# ----------------------------------------------------------------------------------------------------
# document streams: what attnres-prepare reads
# ----------------------------------------------------------------------------------------------------
@dataclass
class DocumentStream:
    """Documents read in a fixed order, each with the key that decides its part.

    ``parts`` is ``(TRAIN, VALIDATION)`` when documents are held out by a hash of their key, or a single part
    when the source names a split for it. ``documents()`` opens the stream again from its start.
    """

    name: str
    parts: tuple[str, ...]
    documents: Callable[[], Iterator[tuple[str, str]]]  # (hold-out key, text)


def document_streams(cfg: DataConfig) -> tuple[dict, list[DocumentStream]]:
    """``(identity, streams)`` of a stdlib or hf source. ``identity`` changes whenever the documents may have
    (file sizes and times, a dataset's fingerprint), so a cached preparation is never reused for other data."""
    if cfg.source == "stdlib":
        return _stdlib_streams(cfg)
    if cfg.source == "hf":
        return _hf_streams(cfg)
    raise DataConfigError(f"data.source={cfg.source!r}: has no documents to prepare (expected 'stdlib' or 'hf')")


def _stdlib_streams(cfg: DataConfig) -> tuple[dict, list[DocumentStream]]:
    root = stdlib_root()
    files = list_stdlib_files(root)
    stats = [(f, os.stat(root / f).st_size, os.stat(root / f).st_mtime_ns) for f in files]
    digest = hashlib.blake2b(json.dumps(stats).encode("utf-8"), digest_size=12).hexdigest()
    identity = {"root": str(root), "python": sys.version, "files": len(files), "files_digest": digest}

    def documents() -> Iterator[tuple[str, str]]:
        for relative in files:
            with open(root / relative, encoding="utf-8", errors="replace") as handle:
                yield relative, handle.read()

    return identity, [DocumentStream("stdlib", PARTS, documents)]


def _hf_streams(cfg: DataConfig) -> tuple[dict, list[DocumentStream]]:
    named = [(TRAIN, "split", cfg.split)]
    if cfg.validation_split is not None:
        named.append((VALIDATION, "validation_split", cfg.validation_split))
    identity: dict[str, Any] = {}
    streams = []
    for part, split_field, split_name in named:
        dataset = _load_split(cfg, split_name, split_field)
        _check_text_field(cfg, dataset, part)
        # Local loads are fingerprinted by datasets from the files' paths, sizes and times; a streamed hub
        # dataset has no fingerprint, and its revision is whatever the hub cache holds.
        identity[split_name] = getattr(dataset, "_fingerprint", None)
        parts = PARTS if cfg.validation_split is None else (part,)
        streams.append(DocumentStream(f"split {split_name!r}", parts, _hf_documents(dataset, cfg.text_field)))
    return identity, streams


def _hf_documents(dataset: Any, text_field: str) -> Callable[[], Iterator[tuple[str, str]]]:
    def documents() -> Iterator[tuple[str, str]]:
        if hasattr(dataset, "select_columns") and hasattr(dataset, "iter") and not _is_iterable_dataset(dataset):
            for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
                for text in batch[text_field]:
                    yield text or "", text or ""
        else:
            for example in dataset:
                text = example[text_field] or ""
                yield text, text

    return documents


def _is_iterable_dataset(dataset: Any) -> bool:
    return type(dataset).__name__ == "IterableDataset"


# ----------------------------------------------------------------------------------------------------
# hf
# ----------------------------------------------------------------------------------------------------
def load_hf_part(cfg: DataConfig, part: str) -> Any:
    """The documents of one part as a ``datasets.Dataset`` (or ``IterableDataset`` when streaming).

    The result holds only that part's documents (held-out filtering and ``max_documents`` applied) and is
    known to have ``cfg.text_field``. Every failure is a ``DataConfigError`` naming the responsible field.
    """
    check_part(part)
    if part == VALIDATION and cfg.validation_split is not None:
        split_field, split_name = "validation_split", cfg.validation_split
    else:
        split_field, split_name = "split", cfg.split
    holdout = cfg.validation_split is None  # a named validation split leaves the training split whole
    dataset = _load_split(cfg, split_name, split_field)
    _check_text_field(cfg, dataset, part)
    if holdout:
        dataset = _filter_held_out(cfg, dataset, want_validation=(part == VALIDATION))
    if cfg.max_documents is not None:
        if cfg.streaming:
            dataset = dataset.take(cfg.max_documents)
        else:
            dataset = dataset.select(range(min(cfg.max_documents, len(dataset))))
    return dataset


def _resolve_load_arguments(cfg: DataConfig) -> tuple[str, Any, str, Optional[str]]:
    """(path argument, data_files, field to blame on failure, builder if known)."""
    data_files = _absolute_local_files(cfg.hf_data_files)
    if cfg.hf_dataset is not None:
        value = cfg.hf_dataset
        if looks_like_local_path(value):
            local = os.path.abspath(os.path.expanduser(value))
            if not os.path.exists(local):
                raise DataConfigError(f"data.hf_dataset={value!r}: no such local file or directory")
            if os.path.isfile(local):
                if data_files is not None:
                    raise DataConfigError(
                        f"data.hf_dataset={value!r}: is a single file, so data.hf_data_files must be null "
                        "(list several files in data.hf_data_files instead)"
                    )
                builder = infer_builder(local)
                if builder is None:
                    raise DataConfigError(
                        f"data.hf_dataset={value!r}: cannot infer the format from the extension "
                        "(expected .txt, .json, .jsonl, .parquet or .csv)"
                    )
                return builder, [local], "hf_dataset", builder
            return local, data_files, "hf_dataset", None
        return value, data_files, "hf_dataset", value if value in ("text", "json", "parquet", "csv") else None
    builder = infer_builder(flatten_data_files(data_files)[0])
    return builder, data_files, "hf_data_files", builder  # type: ignore[return-value]


def _absolute_local_files(files: Any) -> Any:
    """Make local paths absolute (the run may change directory) and check they exist."""
    if files is None:
        return None
    if isinstance(files, dict):
        return {split: _absolute_local_files(group) for split, group in files.items()}
    if isinstance(files, str):
        return _absolute_local_files([files])
    out = []
    for name in files:
        is_remote = "://" in name
        is_glob = any(ch in name for ch in "*?[")
        if is_remote or is_glob:
            out.append(name)
            continue
        local = os.path.abspath(os.path.expanduser(name))
        if not os.path.exists(local):
            raise DataConfigError(f"data.hf_data_files: no such file {name!r} (resolved to {local})")
        out.append(local)
    return out


def _load_split(cfg: DataConfig, split_name: str, split_field: str) -> Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a hard dependency
        raise DataConfigError("data.source='hf': needs the 'datasets' package") from exc
    path, data_files, blame, builder = _resolve_load_arguments(cfg)
    kwargs: dict[str, Any] = {"split": split_name, "streaming": cfg.streaming, "cache_dir": cfg.cache_dir}
    if data_files is not None:
        kwargs["data_files"] = data_files
    if cfg.hf_config is not None:
        kwargs["name"] = cfg.hf_config
    if builder == "text":
        kwargs["sample_by"] = cfg.hf_text_sample_by
    blamed_value = getattr(cfg, blame)
    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as exc:  # FileNotFoundError, hub / connection errors, bad files: all "cannot load"
        if isinstance(exc, ValueError) and "unknown split" in str(exc).lower():
            raise DataConfigError(f"data.{split_field}={split_name!r}: {_first_line(exc)}") from exc
        raise DataConfigError(
            f"data.{blame}={blamed_value!r}: could not load the dataset ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc


def _check_text_field(cfg: DataConfig, dataset: Any, part: str) -> None:
    columns = dataset.column_names
    if columns is None:  # streaming without declared features: look at the first document
        first = next(iter(dataset.take(1)), None)
        columns = list(first) if first is not None else None
    if columns is not None and cfg.text_field not in columns:
        raise DataConfigError(
            f"data.text_field={cfg.text_field!r}: no such column in the {part} data (columns: {list(columns)})"
        )


def _filter_held_out(cfg: DataConfig, dataset: Any, want_validation: bool) -> Any:
    fraction = cfg.validation_fraction
    if fraction == 0.0 and not want_validation:
        return dataset  # nothing is held out: skip a pass over the data
    if cfg.streaming:
        return dataset.filter(lambda text: is_held_out(text or "", fraction) == want_validation,
                              input_columns=[cfg.text_field])
    fingerprint = getattr(dataset, "_fingerprint", None)
    new_fingerprint = None
    if fingerprint is not None:  # a deterministic name lets datasets reuse the filtered cache on the next run
        key = f"{fingerprint}|holdout|{fraction!r}|{want_validation}|{cfg.text_field}"
        new_fingerprint = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return dataset.filter(
        lambda texts: [is_held_out(t or "", fraction) == want_validation for t in texts],
        batched=True,
        input_columns=[cfg.text_field],
        num_proc=cfg.num_workers or None,
        new_fingerprint=new_fingerprint,
        desc=f"hold out {fraction:g} for validation",
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
