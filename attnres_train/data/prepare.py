"""Prepare once: documents -> token shards + document index + manifest (the format is in ``prepared.py``).

The documents of the source are read in order and cut into *chunks* of about ``shard_text_bytes`` of text.
Chunk ``k`` is tokenized by a worker process into the shards ``train-k`` and ``validation-k`` (each document
goes to the part its hold-out key hashes to, as in training). Everything is deterministic: the same source,
tokenizer and chunk size give byte-identical files whatever the number of workers.

Restartable: a chunk's shards are written to temporary files and renamed into place, then a small record of
the chunk (sizes, times, SHA-256) is written the same way under ``.progress/``. Killed at any moment and run
again with the same settings, the preparation re-reads the source (reading is cheap next to tokenizing),
skips every chunk whose record and files are intact and tokenizes the rest. The manifest is written last, so a
reader never sees a dataset that is not whole.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from attnres_train.atomic_files import atomic_write

from .config import DataConfig, DataConfigError
from .prepared import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    read_manifest,
    sha256_of_file,
    token_dtype,
    write_json_atomically,
)
from .sources import PARTS, TRAIN, VALIDATION, DocumentStream, document_streams, is_held_out
from .tokenizer import ByteTokenizer, Tokenizer, build_tokenizer

DEFAULT_SHARD_TEXT_BYTES = 64 * 2**20
PROGRESS_DIR = ".progress"
PLAN_NAME = "plan.json"
CACHE_ENV = "ATTNRES_TRAIN_CACHE"
_ENCODE_BATCH = 1024  # documents per Hugging Face tokenizer call


# ----------------------------------------------------------------------------------------------------
# tokenizing one chunk (runs in a worker process)
# ----------------------------------------------------------------------------------------------------
def encode_with_index(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, document_ends)``: the documents as ``doc EOS doc EOS ...`` and the end offset of each
    (exclusive, EOS included). Documents that encode to nothing are dropped."""
    dtype = token_dtype(tokenizer.vocab_size)
    if isinstance(tokenizer, ByteTokenizer):
        encoded = [t.encode("utf-8") for t in texts if t]
        ends = np.cumsum(np.fromiter((len(b) + 1 for b in encoded), dtype=np.int64, count=len(encoded)))
        total = int(ends[-1]) if len(ends) else 0
        tokens = np.full(total, tokenizer.eos_token_id, dtype=dtype)
        is_text = np.ones(total, dtype=bool)
        is_text[ends - 1] = False
        tokens[is_text] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return tokens, ends
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    texts = [t for t in texts if t]
    for start in range(0, len(texts), _ENCODE_BATCH):
        for ids in tokenizer.encode_batch(texts[start : start + _ENCODE_BATCH]):
            if ids:
                pieces.extend((np.asarray(ids, dtype=dtype), eos))
                lengths.append(len(ids) + 1)
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
    return tokens, np.cumsum(np.asarray(lengths, dtype=np.int64))


def _save_npy(path: Path, array: np.ndarray) -> dict:
    """Write ``array`` as .npy through a temporary file + fsync + rename; its manifest entry."""
    # The pid in the temporary's name lets a rerun tell a killed writer's leftovers from a live worker's.
    atomic_write(path, lambda out: np.save(out, array), temp_path=path.with_name(f".{path.name}.{os.getpid()}.tmp"))
    stat = os.stat(path)
    return {"file": path.name, "size_bytes": stat.st_size, "sha256": sha256_of_file(path), "mtime_ns": stat.st_mtime_ns}


_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer_name: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: N workers use N cores
    _worker_tokenizer = build_tokenizer({"tokenizer": tokenizer_name})


@dataclass
class Chunk:
    index: int
    texts: dict[str, list[str]] = field(default_factory=lambda: {p: [] for p in PARTS})
    text_bytes: int = 0


def _tokenize_chunk(chunk: Chunk, out_dir: Path, tokenizer: Optional[Tokenizer] = None) -> dict:
    tokenizer = tokenizer if tokenizer is not None else _worker_tokenizer
    assert tokenizer is not None
    encoded = {part: encode_with_index(tokenizer, texts) for part, texts in chunk.texts.items() if texts}
    return write_chunk(out_dir, chunk.index, encoded, chunk.text_bytes)


def write_chunk(out_dir: Path, index: int, encoded: dict[str, tuple[np.ndarray, np.ndarray]], text_bytes: int) -> dict:
    """Write chunk ``index``'s shards (``{part: (tokens, document_ends)}``; empty parts skipped) and return
    its record, the manifest entries of its shards."""
    record: dict[str, Any] = {"chunk": index, "text_bytes": text_bytes, "parts": {}}
    for part, (tokens, ends) in encoded.items():
        if not len(ends):
            continue
        stem = f"{part}-{index:06d}"
        record["parts"][part] = {
            "tokens": _save_npy(out_dir / f"{stem}.tokens.npy", tokens),
            "documents": _save_npy(out_dir / f"{stem}.docs.npy", ends),
            "num_tokens": int(tokens.size),
            "num_documents": int(ends.size),
        }
    return record


def write_manifest(out_dir: Path, plan: dict, records: list[dict]) -> dict:
    """The manifest of ``plan`` and the chunk ``records`` (in chunk order), written atomically: from this
    moment on the directory is a prepared dataset."""
    parts = {}
    for part in PARTS:
        shards = [r["parts"][part] for r in records if part in r["parts"]]
        parts[part] = {"num_documents": sum(s["num_documents"] for s in shards),
                       "num_tokens": sum(s["num_tokens"] for s in shards), "shards": shards}
    manifest = {**plan, "parts": parts, "num_chunks": len(records), "text_bytes": sum(r["text_bytes"] for r in records)}
    write_json_atomically(out_dir / MANIFEST_NAME, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------
# the preparation
# ----------------------------------------------------------------------------------------------------
def preparation_plan(cfg: DataConfig, tokenizer: Tokenizer, source_identity: dict, shard_text_bytes: int) -> dict:
    """Everything that decides the prepared files; two preparations with equal plans write equal files."""
    fields = cfg.stream_fields()
    for name in ("seq_len", "tokenizer", "shuffle_buffer_size", "path", "mixture", "verify_shards"):
        fields.pop(name, None)  # windows are cut at load time; the tokenizer is recorded by identity
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": cfg.tokenizer, "identity": tokenizer.identity, "vocab_size": tokenizer.vocab_size,
                      "eos_token_id": tokenizer.eos_token_id},
        "token_dtype": token_dtype(tokenizer.vocab_size).name,
        "source": {"data": {f"data.{k}": v for k, v in fields.items()}, "identity": source_identity},
        "split": {
            "rule": "hash of the document key" if cfg.validation_split is None or cfg.source == "stdlib"
            else "named splits",
            "key": "relative path" if cfg.source == "stdlib" else "document text",
            "hash": "blake2b-64 / 2**64 < validation_fraction",
            "validation_fraction": cfg.validation_fraction,
            "validation_split": cfg.validation_split if cfg.source == "hf" else None,
        },
        "shard_text_bytes": shard_text_bytes,
    }


def _plan_differences(saved: dict, plan: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(plan)):
        a, b = saved.get(key), plan.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_plan_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{key if key.startswith('data.') else prefix + key}: there {a!r}, now {b!r}")
    return out


def _chunks(streams: list[DocumentStream], cfg: DataConfig, shard_text_bytes: int) -> Iterator[Chunk]:
    """The source cut into chunks, each document assigned to its part; ``max_documents`` caps each part."""
    index = 0
    taken = {part: 0 for part in PARTS}
    cap = cfg.max_documents
    for stream in streams:
        chunk = Chunk(index)
        for key, text in stream.documents():
            if not text:
                continue
            if len(stream.parts) == 1:
                part = stream.parts[0]
            else:
                part = VALIDATION if is_held_out(key, cfg.validation_fraction) else TRAIN
            if cap is not None:
                if all(taken[p] >= cap for p in stream.parts):
                    break
                if taken[part] >= cap:
                    continue
            taken[part] += 1
            chunk.texts[part].append(text)
            chunk.text_bytes += len(text.encode("utf-8")) if not text.isascii() else len(text)
            if chunk.text_bytes >= shard_text_bytes:
                yield chunk
                index += 1
                chunk = Chunk(index)
        if chunk.text_bytes:
            yield chunk
            index += 1


def _intact(record: dict, out_dir: Path) -> bool:
    for entry in record.get("parts", {}).values():
        for file in (entry["tokens"], entry["documents"]):
            try:
                stat = os.stat(out_dir / file["file"])
            except FileNotFoundError:
                return False
            if stat.st_size != file["size_bytes"] or stat.st_mtime_ns != file["mtime_ns"]:
                return False
    return True


def _read_record(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class _Progress:
    """A tqdm bar on stderr over text bytes, with tokens/s; skipped chunks are counted apart."""

    def __init__(self, enabled: bool):
        self.start = time.perf_counter()
        self.text_bytes = 0
        self.tokens = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(desc="prepare", unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                            dynamic_ncols=True)

    def done(self, record: dict, skipped: bool) -> None:
        if skipped:
            if self.bar is not None:
                self.bar.set_description("prepare (finished chunks skipped)")
            return
        self.text_bytes += record["text_bytes"]
        tokens = sum(p["num_tokens"] for p in record["parts"].values())
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(record["text_bytes"])
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens / elapsed / 1e6:.2f}M tok/s", refresh=False)

    def close(self) -> dict:
        if self.bar is not None:
            self.bar.close()
        elapsed = time.perf_counter() - self.start
        return {"seconds": elapsed, "text_bytes": self.text_bytes, "tokens": self.tokens}


def prepare_dataset(
    cfg: Any,
    out_dir: str | os.PathLike,
    num_workers: Optional[int] = None,
    shard_text_bytes: int = DEFAULT_SHARD_TEXT_BYTES,
    progress: bool = True,
) -> dict:
    """Prepare the stdlib or hf source of ``cfg`` (the ``data`` group) into ``out_dir``; returns the manifest.

    ``num_workers`` tokenizing processes (default ``data.num_workers``; 0 tokenizes in this process). An
    ``out_dir`` that already holds a dataset prepared with the same plan is returned as it is; one prepared
    from other data or another tokenizer is refused, never overwritten.
    """
    data_cfg = DataConfig.from_mapping(cfg)
    if data_cfg.source == "prepared":
        raise DataConfigError("data.source='prepared': that data is prepared already (expected stdlib or hf)")
    if not isinstance(shard_text_bytes, int) or shard_text_bytes < 1:
        raise DataConfigError(f"shard_mb: expected a positive size, got {shard_text_bytes!r} bytes")
    workers = data_cfg.num_workers if num_workers is None else num_workers
    if not isinstance(workers, int) or workers < 0:
        raise DataConfigError(f"workers={workers!r}: expected an integer >= 0")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise DataConfigError(f"out_dir={str(out)!r}: is a file, expected a directory to write the dataset into")
    tokenizer = build_tokenizer(data_cfg)
    identity, streams = document_streams(data_cfg)  # opens the source: a bad one fails before anything is written
    plan = preparation_plan(data_cfg, tokenizer, identity, shard_text_bytes)

    if (out / MANIFEST_NAME).exists():
        manifest = read_manifest(out, "out_dir")
        differences = _plan_differences({k: manifest.get(k) for k in plan}, plan)
        if differences:
            raise DataConfigError(
                f"out_dir={str(out)!r} holds a dataset prepared differently ({'; '.join(differences[:3])}); "
                "choose another out_dir (nothing was changed)"
            )
        return manifest
    progress_dir = out / PROGRESS_DIR
    saved_plan = _read_record(progress_dir / PLAN_NAME)
    if saved_plan is not None and saved_plan != plan:
        differences = _plan_differences(saved_plan, plan)
        raise DataConfigError(
            f"out_dir={str(out)!r} holds an unfinished preparation of other data ({'; '.join(differences[:3])}); "
            "finish it with its own settings or choose another out_dir (nothing was changed)"
        )
    if out.exists() and saved_plan is None and any(out.iterdir()):
        raise DataConfigError(f"out_dir={str(out)!r}: exists and is not empty; choose a new or empty directory")
    created = not out.exists()
    if not created:
        _remove_abandoned_temporaries(out)
    progress_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(progress_dir / PLAN_NAME, plan)

    meter = _Progress(progress)
    records: list[dict] = []
    try:
        records = _run_chunks(data_cfg, streams, out, progress_dir, workers, shard_text_bytes, meter)
    finally:
        stats = meter.close()
    if not any(TRAIN in r["parts"] for r in records):
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            shutil.rmtree(progress_dir, ignore_errors=True)
        raise DataConfigError(f"{_source_field(data_cfg)}: the source has no training documents (every document "
                              "was empty, held out for validation, or capped by data.max_documents); nothing written")
    manifest = write_manifest(out, plan, records)
    shutil.rmtree(progress_dir, ignore_errors=True)
    parts = manifest["parts"]
    if progress:
        mb = stats["text_bytes"] / 1e6
        print(f"prepared {out}: {parts[TRAIN]['num_tokens']:,} train / {parts[VALIDATION]['num_tokens']:,} "
              f"validation tokens in {len(records)} chunks; tokenized {mb:.1f} MB in {stats['seconds']:.1f} s "
              f"({mb / max(stats['seconds'], 1e-9):.1f} MB/s)", file=sys.stderr, flush=True)
    return manifest


def _remove_abandoned_temporaries(out: Path) -> None:
    """Temporary shard files of a preparation that was killed (their writer's process is gone)."""
    for temporary in out.glob(".*.tmp"):
        pid = temporary.name.rsplit(".", 2)[-2]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            temporary.unlink(missing_ok=True)
        except PermissionError:
            pass  # a live process of another user


def _source_field(cfg: DataConfig) -> str:
    if cfg.source == "stdlib":
        return "data.source='stdlib'"
    if cfg.hf_dataset is not None:
        return f"data.hf_dataset={cfg.hf_dataset!r}"
    return f"data.hf_data_files={cfg.hf_data_files!r}"


def _run_chunks(cfg: DataConfig, streams, out: Path, progress_dir: Path, workers: int, shard_text_bytes: int,
                meter: _Progress) -> list[dict]:
    records: dict[int, dict] = {}

    def finish(record: dict) -> None:
        write_json_atomically(progress_dir / f"chunk-{record['chunk']:06d}.json", record)
        records[record["chunk"]] = record
        meter.done(record, skipped=False)

    def pending() -> Iterator[Chunk]:
        for chunk in _chunks(streams, cfg, shard_text_bytes):
            saved = _read_record(progress_dir / f"chunk-{chunk.index:06d}.json")
            if saved is not None and _intact(saved, out):
                records[chunk.index] = saved
                meter.done(saved, skipped=True)
                continue
            yield chunk

    if workers == 0:
        tokenizer = build_tokenizer(cfg)
        for chunk in pending():
            finish(_tokenize_chunk(chunk, out, tokenizer))
    else:
        # spawn, not fork: a Hugging Face tokenizer used in this process must not be forked mid-use.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                    initargs=(cfg.tokenizer,)) as pool:
            in_flight: set = set()
            for chunk in pending():
                in_flight.add(pool.submit(_tokenize_chunk, chunk, out))
                if len(in_flight) >= 2 * workers:  # bounded: at most 2 chunks of text per worker in memory
                    done, in_flight = concurrent.futures.wait(in_flight, return_when="FIRST_COMPLETED")
                    for future in done:
                        finish(future.result())
            for future in concurrent.futures.as_completed(in_flight):
                finish(future.result())
    return [records[i] for i in sorted(records)]


# ----------------------------------------------------------------------------------------------------
# prepared on first use (the trainer's stdlib and non-streaming hf sources)
# ----------------------------------------------------------------------------------------------------
def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$ATTNRES_TRAIN_CACHE``, else ``$XDG_CACHE_HOME/attnres-train``
    (``~/.cache/attnres-train``)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser().resolve()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnres-train"


def ensure_prepared(cfg: Any, tokenizer: Optional[Tokenizer] = None, progress: bool = True) -> Path:
    """The prepared directory of a stdlib / non-streaming hf source under the cache, prepared on first use.

    Concurrent callers (the ranks of a node) take a file lock: one prepares, the others wait and reuse it.
    The directory name is a digest of the preparation plan, so changed data or tokenizer prepare anew.
    """
    data_cfg = DataConfig.from_mapping(cfg)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(data_cfg)
    identity, _ = document_streams(data_cfg)
    plan = preparation_plan(data_cfg, tokenizer, identity, DEFAULT_SHARD_TEXT_BYTES)
    digest = hashlib.blake2b(json.dumps(plan, sort_keys=True, default=str).encode(), digest_size=10).hexdigest()
    target = cache_root(data_cfg) / "prepared" / f"{data_cfg.source}-{digest}"
    if (target / MANIFEST_NAME).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        if not (target / MANIFEST_NAME).exists():
            prepare_dataset(data_cfg, target, progress=progress)
    return target


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
