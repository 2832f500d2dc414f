"""Typed schema of the ``data`` config group and its validation.

Every field is documented where it is declared. ``validate`` raises ``DataConfigError`` whose message names
the offending field (``data.<field>``), its value and what was expected. The same error type reports data
that cannot be found at build time (a missing file, dataset, split, text column or tokenizer), so a caller
catches one exception for "the data section of the config is wrong".
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

from attnres_train.schema import plain_container, section_from_mapping

SOURCES = ("stdlib", "hf", "prepared")
VERIFY_SHARDS = ("auto", "always", "never")
TEXT_SAMPLE_BY = ("document", "paragraph", "line")

# File extension -> datasets builder. Compression suffixes are stripped first (datasets decompresses them).
BUILDER_BY_EXTENSION = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")

# Fields that do not change which samples the loader produces (only where or how fast they are computed);
# they are left out of the resume fingerprint so a resumed run may change them.
NON_STREAM_FIELDS = ("num_workers", "cache_dir", "verify_shards")


class DataConfigError(ValueError):
    """A data config field has an impossible value or names data that cannot be found; the message names it."""


@dataclass
class DataConfig:
    # --- where documents come from ------------------------------------------------------------------
    # stdlib: the running interpreter's standard-library *.py files | hf: datasets.load_dataset | prepared: token
    # shards written by attnres-prepare (data.path or data.mixture). stdlib and non-streaming hf data are
    # prepared into the cache on first use and then read exactly like prepared data.
    source: str = "stdlib"
    path: Optional[str] = None  # prepared only: a directory written by attnres-prepare (or use data.mixture)
    # prepared only: several prepared datasets mixed by weight, a list of {path, weight, name}; name defaults to
    # the directory's name and labels the source's validation loss (val_loss_by_source in metrics.jsonl).
    # Each global batch takes every source's share to within one sample; each source epochs on its own.
    mixture: Any = None
    # prepared data: recompute shard checksums when a file's modification time differs from the one recorded
    # (auto), at every start (always), or never; a size that differs from the manifest is always refused.
    verify_shards: str = "auto"
    # hf only: a hub dataset name ("roneneldan/TinyStories"), a builder name used with hf_data_files ("json"),
    # a local dataset directory, or a single local data file (its builder is inferred from the extension).
    hf_dataset: Optional[str] = None
    hf_config: Optional[str] = None  # hf only: dataset config name (load_dataset's `name`), e.g. "wikitext-103-raw-v1"
    # hf only: str | list[str] | {split: str | list[str]} of local paths / globs / URLs. Without hf_dataset the
    # builder is inferred from the extension: .txt/.text -> text, .json/.jsonl/.ndjson -> json, .parquet, .csv.
    # A str or list becomes the split "train".
    hf_data_files: Any = None
    hf_text_sample_by: str = "document"  # hf text builder only: one document per file | paragraph | line
    split: str = "train"  # hf only: split the training documents come from
    # hf only: split used for validation; null holds out `validation_fraction` of `split` instead, chosen by a
    # hash of each document's text (so the held-out set does not depend on order, shuffling or sharding).
    validation_split: Optional[str] = None
    text_field: str = "text"  # hf only: column holding the document text
    streaming: bool = False  # hf only: iterate the dataset lazily (IterableDataset) instead of tokenizing it up front
    shuffle_buffer_size: int = 10_000  # hf streaming only: documents in the shuffle buffer of each epoch

    # --- tokenization and packing ---------------------------------------------------------------------
    # "byte" (UTF-8 bytes, vocab 258, nothing to download) | a Hugging Face tokenizer: a local directory or a
    # hub name already in the local cache (set HF_HUB_OFFLINE=1 to never touch the network).
    tokenizer: str = "byte"
    seq_len: int = 512  # tokens per training row; rows are packed windows of seq_len + 1 tokens (inputs + 1 label)

    # --- splitting, limits, plumbing ------------------------------------------------------------------
    # Fraction of documents held out for validation (at preparation): stdlib files by a hash of their relative path;
    # hf documents by a hash of their text when validation_split is null. 0 means no validation data.
    validation_fraction: float = 0.05
    max_documents: Optional[int] = None  # cap on documents per part (train / validation), in source order; for tests
    num_workers: int = 0  # hf non-streaming: processes tokenizing the dataset (datasets num_proc); 0 = this process
    # Where to keep caches: hf datasets' cache_dir and the prepared token shards of stdlib / hf sources
    # (<cache_dir>/prepared/). null: datasets' default cache, and $ATTNRES_TRAIN_CACHE or ~/.cache/attnres-train
    # for the shards. Hugging Face tokenizers always use the hub cache (HF_HOME).
    cache_dir: Optional[str] = None

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, cfg: Any) -> "DataConfig":
        """Build from a DictConfig, a dict or a DataConfig; unknown keys are an error naming the key."""
        out = section_from_mapping(cls, cfg, "data", DataConfigError)
        out.hf_data_files = plain_container(out.hf_data_files)
        out.mixture = plain_container(out.mixture)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise ``DataConfigError`` naming the first field with an impossible value."""

        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise DataConfigError(f"data.{name}={getattr(self, name)!r}: expected {expected}")

        self.hf_data_files = plain_container(self.hf_data_files)
        need(self.source in SOURCES, "source", f"one of {SOURCES}")
        need(isinstance(self.tokenizer, str) and self.tokenizer.strip() != "", "tokenizer",
             "'byte', a local tokenizer directory or a Hugging Face hub name")
        need(_is_int(self.seq_len) and self.seq_len >= 1, "seq_len", "a positive integer")
        need(
            isinstance(self.validation_fraction, (int, float)) and 0.0 <= self.validation_fraction < 1.0,
            "validation_fraction",
            "a fraction in [0, 1)",
        )
        need(
            self.max_documents is None or (_is_int(self.max_documents) and self.max_documents >= 1),
            "max_documents",
            "null (no cap) or a positive integer",
        )
        need(_is_int(self.num_workers) and self.num_workers >= 0, "num_workers", "an integer >= 0")
        need(
            _is_int(self.shuffle_buffer_size) and self.shuffle_buffer_size >= 1,
            "shuffle_buffer_size",
            "a positive integer",
        )
        need(isinstance(self.streaming, bool), "streaming", "true or false")
        need(self.verify_shards in VERIFY_SHARDS, "verify_shards", f"one of {VERIFY_SHARDS}")
        if self.source == "prepared":
            self._validate_prepared(need)
            return
        if self.source != "hf":
            return
        need(
            self.hf_dataset is not None or self.hf_data_files is not None,
            "hf_dataset",
            "a hub dataset name or local path (or set data.hf_data_files) when data.source='hf'",
        )
        need(self.hf_dataset is None or (isinstance(self.hf_dataset, str) and self.hf_dataset != ""),
             "hf_dataset", "null or a non-empty string")
        need(isinstance(self.split, str) and self.split != "", "split", "a non-empty split name")
        need(
            self.validation_split is None or (isinstance(self.validation_split, str) and self.validation_split != ""),
            "validation_split",
            "null (hold out data.validation_fraction) or a split name",
        )
        need(self.validation_split != self.split, "validation_split", f"a split other than data.split={self.split!r}")
        need(isinstance(self.text_field, str) and self.text_field != "", "text_field", "a non-empty column name")
        need(self.hf_text_sample_by in TEXT_SAMPLE_BY, "hf_text_sample_by", f"one of {TEXT_SAMPLE_BY}")
        if self.hf_data_files is not None:
            files = self.hf_data_files
            if isinstance(files, dict):
                need(len(files) > 0 and all(isinstance(k, str) for k in files), "hf_data_files",
                     "a non-empty {split: files} mapping")
                groups = list(files.values())
            else:
                groups = [files]
            for group in groups:
                is_path_list = isinstance(group, list) and len(group) > 0 and all(isinstance(f, str) for f in group)
                need(
                    isinstance(group, str) or is_path_list,
                    "hf_data_files",
                    "a path, a non-empty list of paths, or a {split: path(s)} mapping",
                )
            if self.hf_dataset is None:
                builders = {infer_builder(f) for f in flatten_data_files(files)}
                need(
                    None not in builders,
                    "hf_data_files",
                    f"files ending in one of {sorted(BUILDER_BY_EXTENSION)} (optionally compressed), "
                    "or set data.hf_dataset to the builder name (e.g. 'json')",
                )
                need(len(builders) == 1, "hf_data_files", f"files of one format, got {sorted(map(str, builders))}")

    def _validate_prepared(self, need) -> None:
        self.mixture = plain_container(self.mixture)
        need((self.path is None) != (self.mixture is None), "path",
             "a prepared dataset directory, or null with data.mixture set (exactly one of the two)")
        need(self.path is None or (isinstance(self.path, str) and self.path != ""), "path",
             "a prepared dataset directory")
        if self.mixture is None:
            return
        need(isinstance(self.mixture, list) and len(self.mixture) > 0, "mixture",
             "a non-empty list of {path, weight, name} entries")
        names = []
        for i, entry in enumerate(self.mixture):
            where = f"data.mixture[{i}]"
            if not isinstance(entry, dict) or set(entry) - {"path", "weight", "name"} or "path" not in entry:
                raise DataConfigError(f"{where}={entry!r}: expected {{path: DIR, weight: W, name: NAME}} "
                                      "(weight defaults to 1, name to the directory's name)")
            if not isinstance(entry["path"], str) or not entry["path"]:
                raise DataConfigError(f"{where}.path={entry['path']!r}: expected a prepared dataset directory")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0 or weight == float("inf"):
                raise DataConfigError(f"{where}.weight={weight!r}: expected a finite number >= 0")
            name = entry.get("name")
            if name is not None and (not isinstance(name, str) or not name or "/" in name):
                raise DataConfigError(f"{where}.name={name!r}: expected a non-empty name without '/'")
            names.append(name if name is not None else os.path.basename(os.path.normpath(entry["path"])))
        if sum(float(e.get("weight", 1.0)) for e in self.mixture) <= 0:
            raise DataConfigError(f"data.mixture: every weight is 0; at least one source needs a weight > 0")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        need(not duplicates, "mixture", f"distinct source names (give each entry a name; {duplicates} repeat)")

    def mixture_sources(self) -> list[tuple[str, str, float]]:
        """``(name, path, weight)`` of each prepared source (one, weight 1, for data.path)."""
        if self.path is not None:
            return [(os.path.basename(os.path.normpath(self.path)), self.path, 1.0)]
        return [(e.get("name") or os.path.basename(os.path.normpath(e["path"])), e["path"], float(e.get("weight", 1.0)))
                for e in self.mixture or []]

    def stream_fields(self) -> dict:
        """The fields that decide the sample stream: caches, worker counts and fields the chosen source
        ignores are left out, so changing them does not invalidate a resume."""
        out = dataclasses.asdict(self)
        ignored = list(NON_STREAM_FIELDS)
        if self.source != "prepared":
            ignored += ["path", "mixture"]
        else:  # what the prepared directories hold is fingerprinted by their content, not these fields
            ignored += [f for f in out if f not in ("source", "seq_len")]  # tokenizer: by identity
        if self.source == "stdlib":
            ignored += [f for f in out if f.startswith("hf_")]
            ignored += ["split", "validation_split", "text_field", "streaming"]
        if not (self.source == "hf" and self.streaming):
            ignored.append("shuffle_buffer_size")
        for name in ignored:
            out.pop(name, None)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def infer_builder(path: str) -> Optional[str]:
    """datasets builder for a data file from its extension (compression suffix ignored), or None."""
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return BUILDER_BY_EXTENSION.get(os.path.splitext(name)[1])


def flatten_data_files(files: Any) -> list[str]:
    """All paths of a data_files value (str, list or {split: str | list})."""
    if files is None:
        return []
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for group in files.values() for f in flatten_data_files(group)]
    return list(files)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


