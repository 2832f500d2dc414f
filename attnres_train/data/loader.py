"""Packed, data-parallel-sharded, exactly resumable loaders.

Packing: documents are tokenized and joined as ``doc EOS doc EOS ...`` into one token stream. Sample ``i``
is the window ``stream[i*T : i*T + T + 1]`` (consecutive windows share one token, so every token is a label
exactly once); ``input_ids = window[:-1]``, ``labels = window[1:]``, and ``doc_ids`` restart after every EOS
(``doc_ids_from_eos``) so mixers keep packed documents apart.

Sharding: the *global* sample sequence depends only on the data, the tokenizer and the seed, never on the
number of data-parallel ranks. Each step consumes one global batch of ``G = micro_batch_size * dp_world_size``
consecutive samples of that sequence and rank ``r`` takes samples ``[r*B, (r+1)*B)`` of it. One process with
micro batch ``2B`` therefore sees exactly the rows that two ranks with micro batch ``B`` see together.

Epochs: the training sequence is epoch 0, epoch 1, ... back to back (a global batch may straddle two). In
memory (stdlib, non-streaming hf) an epoch is a permutation of all windows drawn from ``(seed, epoch)``; a
streaming epoch re-reads the dataset through a shuffle buffer seeded from ``(seed, epoch)`` and drops the
last partial window.

Resume: ``state_dict()`` records how many global samples were consumed (plus the streaming epoch position)
and a fingerprint of everything that decides the sample sequence; ``load_state_dict`` restores the position so
the next batch is exactly the one an uninterrupted run would have produced. The position is global, so a run
may resume with a different number of ranks or micro batch. A streaming loader re-reads (and re-tokenizes)
the current epoch up to the saved position, which costs time proportional to that position.

Shape legend: B micro batch (rows per rank per step), T seq_len, W = T + 1 window length.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from attnres_train.model.packing import doc_ids_from_eos

from .config import DataConfig, DataConfigError
from .sources import (
    TRAIN,
    VALIDATION,
    check_part,
    load_hf_part,
    read_text_files,
    stdlib_part_files,
    stdlib_root,
)
from .tokenizer import ByteTokenizer, Tokenizer, build_tokenizer

_ENCODE_CHUNK = 64  # documents per tokenizer call while streaming (batch calls are much faster for HF)
_STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# token streams
# ----------------------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id (uint16 for the byte tokenizer and most BPE vocabularies)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_documents(tokenizer: Tokenizer, texts: Sequence[Optional[str]]) -> np.ndarray:
    """``doc EOS doc EOS ...`` as one array; empty (or None) documents are skipped."""
    texts = [t for t in texts if t]
    dtype = token_dtype(tokenizer.vocab_size)
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_documents_to_array(texts).astype(dtype, copy=False)
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    for start in range(0, len(texts), 256):
        for ids in tokenizer.encode_batch(texts[start : start + 256]):
            if ids:
                pieces.extend((np.asarray(ids, dtype=dtype), eos))
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)


@dataclass
class TokenCorpus:
    """One part's documents tokenized into a single ``doc EOS doc EOS ...`` array."""

    tokens: np.ndarray  # 1-D unsigned ints (possibly memory-mapped from the token cache)
    num_documents: int

    def num_windows(self, seq_len: int) -> int:
        """Number of packed samples of ``seq_len + 1`` tokens (stride ``seq_len``)."""
        return max(0, (int(self.tokens.size) - 1) // seq_len)

    def windows(self, window_index: np.ndarray, seq_len: int) -> np.ndarray:
        """Windows ``[len(window_index), seq_len + 1]`` as int64."""
        starts = np.asarray(window_index, dtype=np.int64) * seq_len
        return self.tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)


def build_token_corpus(cfg: Any, tokenizer: Tokenizer, part: str) -> TokenCorpus:
    """Tokenize every document of ``part`` (train / validation) of a non-streaming source."""
    data_cfg = DataConfig.from_mapping(cfg)
    check_part(part)
    if data_cfg.source == "stdlib":
        return _stdlib_corpus(data_cfg, tokenizer, part)
    if data_cfg.streaming:
        raise ValueError("build_token_corpus needs a non-streaming source (data.streaming=false)")
    return _hf_corpus(data_cfg, tokenizer, part)


def _stdlib_corpus(cfg: DataConfig, tokenizer: Tokenizer, part: str) -> TokenCorpus:
    root = stdlib_root()
    files = stdlib_part_files(part, cfg.validation_fraction, cfg.max_documents, root)
    cache_path = _stdlib_cache_path(cfg, tokenizer, part, root, files) if cfg.cache_dir else None
    if cache_path is not None and cache_path.exists():
        return TokenCorpus(np.load(cache_path, mmap_mode="r"), len(files))
    tokens = encode_documents(tokenizer, read_text_files(root, files))
    if cache_path is not None:
        _save_atomically(cache_path, tokens)
    return TokenCorpus(tokens, len(files))


def _stdlib_cache_path(cfg: DataConfig, tokenizer: Tokenizer, part: str, root: Path, files: list[str]) -> Path:
    # Size and mtime of every file stand in for its content: a changed interpreter gives a new cache entry.
    stats = [(f, os.stat(root / f).st_size, os.stat(root / f).st_mtime_ns) for f in files]
    key = json.dumps(
        [tokenizer.identity, part, cfg.validation_fraction, cfg.max_documents, str(root), sys.version, stats]
    )
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=12).hexdigest()
    return Path(cfg.cache_dir).expanduser() / f"stdlib-tokens-{part}-{digest}.npy"


def _save_atomically(path: Path, array: np.ndarray) -> None:
    # Several ranks may build the same cache at once: each writes a private file and renames it into place.
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            np.save(out, array)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _hf_corpus(cfg: DataConfig, tokenizer: Tokenizer, part: str) -> TokenCorpus:
    dataset = load_hf_part(cfg, part)
    eos = tokenizer.eos_token_id
    text_field = cfg.text_field

    def tokenize(texts: list[Optional[str]]) -> dict:
        kept = [t for t in texts if t]
        return {"input_ids": [ids + [eos] for ids in tokenizer.encode_batch(kept) if ids]}

    key = f"{getattr(dataset, '_fingerprint', '')}|{tokenizer.identity}|{text_field}|tokenize-v1"
    tokenized = dataset.map(
        tokenize,
        batched=True,
        input_columns=[text_field],
        remove_columns=dataset.column_names,  # lets a batch return fewer rows (empty documents dropped)
        num_proc=cfg.num_workers or None,
        new_fingerprint=hashlib.blake2b(key.encode("utf-8"), digest_size=8).hexdigest(),
        desc=f"tokenize {part}",
    )
    import pyarrow.compute as pc

    # map writes a fresh table (no indices mapping), so the arrow column is exactly the tokenized rows.
    flat = pc.list_flatten(tokenized.data.column("input_ids"))
    dtype = token_dtype(tokenizer.vocab_size)
    tokens = flat.to_numpy().astype(dtype) if len(flat) else np.empty(0, dtype=dtype)
    return TokenCorpus(tokens, len(dataset))


def pack_windows(documents: Iterable[Optional[str]], tokenizer: Tokenizer, seq_len: int) -> Iterator[np.ndarray]:
    """Windows ``[seq_len + 1]`` (int64) of the stream ``doc EOS doc EOS ...``, cut exactly as
    ``TokenCorpus.windows`` cuts the same documents; empty documents are skipped, the partial tail dropped."""
    eos = np.array([tokenizer.eos_token_id], dtype=np.int64)
    buffer = np.empty(0, dtype=np.int64)
    for chunk in _chunks(documents, _ENCODE_CHUNK):
        texts = [t for t in chunk if t]
        pieces = [buffer]
        for ids in tokenizer.encode_batch(texts) if texts else []:
            if ids:
                pieces.extend((np.asarray(ids, dtype=np.int64), eos))
        buffer = np.concatenate(pieces)
        num_ready = max(0, (buffer.size - 1) // seq_len)
        for i in range(num_ready):
            yield buffer[i * seq_len : i * seq_len + seq_len + 1].copy()
        buffer = buffer[num_ready * seq_len :]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def make_batch(windows_BW: np.ndarray, eos_token_id: int) -> dict[str, torch.Tensor]:
    """Windows ``[B, T + 1]`` -> ``{"input_ids", "labels", "doc_ids"}``, each a LongTensor ``[B, T]``."""
    window_BW = torch.from_numpy(np.ascontiguousarray(windows_BW, dtype=np.int64))
    input_ids_BT = window_BW[:, :-1].contiguous()
    labels_BT = window_BW[:, 1:].contiguous()
    return {"input_ids": input_ids_BT, "labels": labels_BT, "doc_ids": doc_ids_from_eos(input_ids_BT, eos_token_id)}


# ----------------------------------------------------------------------------------------------------
# resume fingerprint
# ----------------------------------------------------------------------------------------------------
class DataStateError(ValueError):
    """A loader state dict does not fit this loader (different data, tokenizer, seed or a malformed dict)."""


def _summary(cfg: DataConfig, tokenizer: Tokenizer, seed: int, **extra: Any) -> dict:
    """Everything that decides the sample sequence, flat and JSON-able (kept in the state for messages)."""
    out = {f"data.{k}": v for k, v in cfg.stream_fields().items()}
    out.update({"tokenizer": tokenizer.identity, "seed": seed, **extra})
    return json.loads(json.dumps(out, default=str))


def _fingerprint(summary: dict) -> str:
    return hashlib.blake2b(json.dumps(summary, sort_keys=True).encode("utf-8"), digest_size=16).hexdigest()


def _check_parallel_arguments(micro_batch_size: int, dp_rank: int, dp_world_size: int) -> None:
    for name, value, low in (("micro_batch_size", micro_batch_size, 1), ("dp_world_size", dp_world_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_world_size:
        raise ValueError(f"dp_rank={dp_rank!r}: expected an integer in [0, dp_world_size={dp_world_size})")


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected an integer >= 0")


def _epoch_seed_sequence(seed: int, epoch: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, epoch])


class _ShardedTrainLoader:
    """Shared bookkeeping of the training loaders: sharding arguments, iterator protocol, state checks."""

    kind = "abstract"

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int, dp_rank: int,
                 dp_world_size: int, seed: int, summary: dict):
        _check_parallel_arguments(micro_batch_size, dp_rank, dp_world_size)
        _check_seed(seed)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.seed = seed
        self.samples_consumed = 0  # global samples (all ranks) handed out so far
        self._summary_dict = summary
        self.fingerprint = _fingerprint(summary)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_world_size

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    def __iter__(self) -> "_ShardedTrainLoader":
        return self

    def _base_state(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "kind": self.kind,
            "samples_consumed": self.samples_consumed,
            "batches_consumed": self.samples_consumed // self.global_batch_size,  # informational
            "global_batch_size": self.global_batch_size,  # informational: a resume may change it
            "fingerprint": self.fingerprint,
            "summary": dict(self._summary_dict),
        }

    def _check_state(self, state: Any, required: tuple[str, ...]) -> None:
        if not isinstance(state, dict):
            raise DataStateError(f"data loader state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("version", "kind", "fingerprint", *required) if k not in state]
        if missing:
            raise DataStateError(f"data loader state is missing {missing} (keys: {sorted(state)})")
        if state["version"] != _STATE_VERSION:
            raise DataStateError(f"data loader state version {state['version']!r}, expected {_STATE_VERSION}")
        if state["kind"] != self.kind:
            raise DataStateError(
                f"data loader state was saved by a {state['kind']} loader, this one is {self.kind} "
                "(did data.source or data.streaming change?)"
            )
        if state["fingerprint"] != self.fingerprint:
            saved = state.get("summary", {})
            changed = sorted(
                k for k in set(saved) | set(self._summary_dict) if saved.get(k) != self._summary_dict.get(k)
            )
            details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {self._summary_dict.get(k)!r}" for k in changed)
            raise DataStateError(
                "data loader state was saved for a different sample sequence, so resuming would repeat or skip "
                f"data ({details or 'fingerprint differs'})"
            )
        if not isinstance(state["samples_consumed"], int) or state["samples_consumed"] < 0:
            raise DataStateError(f"data loader state samples_consumed={state['samples_consumed']!r}: expected int >= 0")


class PackedTrainLoader(_ShardedTrainLoader):
    """Infinite training batches from an in-memory ``TokenCorpus``; epoch ``e`` visits every window once
    in the order ``permutation(seed, e)``."""

    kind = "packed"

    def __init__(self, corpus: TokenCorpus, cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int,
                 dp_rank: int, dp_world_size: int, seed: int):
        self.corpus = corpus
        self.samples_per_epoch = corpus.num_windows(cfg.seq_len)
        summary = _summary(cfg, tokenizer, seed, num_tokens=int(corpus.tokens.size))
        super().__init__(cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, seed, summary)
        if self.samples_per_epoch == 0:
            raise DataConfigError(
                f"data.seq_len={cfg.seq_len}: the training data has {corpus.tokens.size} tokens, fewer than "
                "seq_len + 1; lower data.seq_len or use more documents"
            )
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self.samples_consumed // self.samples_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 4:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng(_epoch_seed_sequence(self.seed, epoch))
            self._permutations[epoch] = rng.permutation(self.samples_per_epoch)
        return self._permutations[epoch]

    def global_window_indices(self, first_sample: int, count: int) -> np.ndarray:
        """Corpus window index of global samples ``first_sample .. first_sample + count - 1``."""
        sample = np.arange(first_sample, first_sample + count, dtype=np.int64)
        epoch, offset = np.divmod(sample, self.samples_per_epoch)
        window = np.empty_like(sample)
        for e in np.unique(epoch):
            chosen = epoch == e
            window[chosen] = self._permutation(int(e))[offset[chosen]]
        return window

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.samples_consumed + self.dp_rank * self.micro_batch_size
        windows_BW = self.corpus.windows(self.global_window_indices(first, self.micro_batch_size), self.seq_len)
        self.samples_consumed += self.global_batch_size
        return make_batch(windows_BW, self.tokenizer.eos_token_id)

    def state_dict(self) -> dict:
        """Small resumable position: global samples consumed, epoch, and the data fingerprint."""
        return {**self._base_state(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue right after the saved position (any micro batch / world size)."""
        self._check_state(state, ("samples_consumed",))
        self.samples_consumed = int(state["samples_consumed"])


class StreamingTrainLoader(_ShardedTrainLoader):
    """Infinite training batches packed on the fly from a streaming ``IterableDataset``.

    Every rank reads the whole stream and keeps its own rows of each global batch, so the global sequence
    does not depend on the number of ranks. Resume re-reads the saved epoch up to the saved position.
    """

    kind = "streaming"

    def __init__(self, dataset: Any, cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int,
                 dp_rank: int, dp_world_size: int, seed: int):
        super().__init__(cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, seed, _summary(cfg, tokenizer, seed))
        self.dataset = dataset
        self.epoch = 0
        self.samples_in_epoch = 0  # windows of the current epoch already consumed (by all ranks)
        self._windows: Optional[Iterator[np.ndarray]] = None

    def _epoch_windows(self, epoch: int) -> Iterator[np.ndarray]:
        epoch_seed = int(_epoch_seed_sequence(self.seed, epoch).generate_state(1)[0])
        shuffled = self.dataset.shuffle(seed=epoch_seed, buffer_size=self.cfg.shuffle_buffer_size)
        texts = (example[self.cfg.text_field] for example in shuffled)
        return pack_windows(texts, self.tokenizer, self.seq_len)

    def _next_window(self) -> np.ndarray:
        while True:
            if self._windows is None:
                self._windows = self._epoch_windows(self.epoch)
                skipped = sum(1 for _ in itertools.islice(self._windows, self.samples_in_epoch))
                if skipped < self.samples_in_epoch:
                    raise DataStateError(
                        f"data loader state points at window {self.samples_in_epoch} of epoch {self.epoch}, "
                        f"but that epoch has only {skipped} windows"
                    )
            window = next(self._windows, None)
            if window is not None:
                self.samples_in_epoch += 1
                return window
            if self.samples_in_epoch == 0:
                raise DataConfigError(
                    f"data.seq_len={self.seq_len}: the streaming training data has fewer than seq_len + 1 "
                    "tokens; lower data.seq_len or use more documents"
                )
            self.epoch += 1
            self.samples_in_epoch = 0
            self._windows = None

    def __next__(self) -> dict[str, torch.Tensor]:
        own_first = self.dp_rank * self.micro_batch_size
        rows = []
        for position in range(self.global_batch_size):
            window = self._next_window()
            if own_first <= position < own_first + self.micro_batch_size:
                rows.append(window)
        self.samples_consumed += self.global_batch_size
        return make_batch(np.stack(rows), self.tokenizer.eos_token_id)

    def state_dict(self) -> dict:
        """Global samples consumed plus the (epoch, window within epoch) to re-read up to on resume."""
        return {**self._base_state(), "epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue right after the saved position; the saved epoch is re-read up to it on the next batch."""
        self._check_state(state, ("samples_consumed", "epoch", "samples_in_epoch"))
        self.samples_consumed = int(state["samples_consumed"])
        self.epoch = int(state["epoch"])
        self.samples_in_epoch = int(state["samples_in_epoch"])
        self._windows = None


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------
class PackedValidationLoader:
    """Finite validation batches: the corpus windows in order, global batch ``k`` split across ranks.

    Iterating again starts over and yields the same batches. ``num_batches`` is capped at the number of
    complete global batches the data holds.
    """

    def __init__(self, corpus: TokenCorpus, cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int,
                 dp_rank: int, dp_world_size: int, num_batches: Optional[int] = None):
        _check_parallel_arguments(micro_batch_size, dp_rank, dp_world_size)
        self.corpus = corpus
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        global_batch = micro_batch_size * dp_world_size
        available = corpus.num_windows(cfg.seq_len) // global_batch
        if available == 0:
            raise DataConfigError(
                f"data.validation_fraction={cfg.validation_fraction}: the validation data has "
                f"{corpus.tokens.size} tokens, fewer than one global batch needs ({global_batch} x seq_len "
                f"{cfg.seq_len} + 1); raise the fraction, use a validation split, or lower data.seq_len"
            )
        if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"num_batches={num_batches!r}: expected null (all) or a positive integer")
        self.num_batches = available if num_batches is None else min(num_batches, available)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        global_batch = self.micro_batch_size * self.dp_world_size
        for k in range(self.num_batches):
            first = k * global_batch + self.dp_rank * self.micro_batch_size
            window_index = np.arange(first, first + self.micro_batch_size)
            yield make_batch(self.corpus.windows(window_index, self.cfg.seq_len), self.tokenizer.eos_token_id)


class StreamingValidationLoader:
    """Finite validation batches read in order from a streaming dataset (no shuffle): the same windows the
    in-memory loader would give. ``num_batches`` None reads the whole part (incomplete last batch dropped)."""

    def __init__(self, dataset: Any, cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int,
                 dp_rank: int, dp_world_size: int, num_batches: Optional[int] = None):
        _check_parallel_arguments(micro_batch_size, dp_rank, dp_world_size)
        if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"num_batches={num_batches!r}: expected null (all) or a positive integer")
        self.dataset = dataset
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.num_batches = num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        global_batch = self.micro_batch_size * self.dp_world_size
        own = slice(self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size)
        texts = (example[self.cfg.text_field] for example in self.dataset)
        windows = pack_windows(texts, self.tokenizer, self.cfg.seq_len)
        produced = 0
        while self.num_batches is None or produced < self.num_batches:
            group = list(itertools.islice(windows, global_batch))
            if len(group) < global_batch:
                if produced == 0:
                    raise DataConfigError(
                        f"data.validation_fraction={self.cfg.validation_fraction}: the streaming validation data "
                        f"holds fewer than one global batch ({global_batch} windows of seq_len "
                        f"{self.cfg.seq_len} + 1)"
                    )
                return
            produced += 1
            yield make_batch(np.stack(group[own]), self.tokenizer.eos_token_id)


# ----------------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------------
TrainLoader = PackedTrainLoader | StreamingTrainLoader
ValidationLoader = PackedValidationLoader | StreamingValidationLoader


def build_train_loader(
    cfg: Any,
    tokenizer: Optional[Tokenizer] = None,
    micro_batch_size: int = 1,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    seed: int = 0,
) -> TrainLoader:
    """Infinite, sharded, resumable training batches for data-parallel rank ``dp_rank``.

    ``cfg`` is the ``data`` group (DictConfig, dict or DataConfig); ``tokenizer`` defaults to
    ``build_tokenizer(cfg)``. Each ``next()`` returns ``{"input_ids", "labels", "doc_ids"}`` of shape
    ``[micro_batch_size, seq_len]``.
    """
    data_cfg = DataConfig.from_mapping(cfg)
    _check_parallel_arguments(micro_batch_size, dp_rank, dp_world_size)
    _check_seed(seed)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(data_cfg)
    if data_cfg.source == "hf" and data_cfg.streaming:
        dataset = load_hf_part(data_cfg, TRAIN)
        return StreamingTrainLoader(dataset, data_cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, seed)
    corpus = build_token_corpus(data_cfg, tokenizer, TRAIN)
    return PackedTrainLoader(corpus, data_cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, seed)


def has_validation_data(cfg: Any) -> bool:
    """Whether the config asks for any validation data (a validation split or a fraction > 0)."""
    data_cfg = DataConfig.from_mapping(cfg)
    return data_cfg.validation_fraction > 0 or (data_cfg.source == "hf" and data_cfg.validation_split is not None)


def build_val_loader(
    cfg: Any,
    tokenizer: Optional[Tokenizer] = None,
    micro_batch_size: int = 1,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    num_batches: Optional[int] = None,
) -> ValidationLoader:
    """Finite, deterministic validation batches (the first ``num_batches`` global batches, rank slice)."""
    data_cfg = DataConfig.from_mapping(cfg)
    _check_parallel_arguments(micro_batch_size, dp_rank, dp_world_size)
    if not has_validation_data(data_cfg):
        raise DataConfigError(
            "data.validation_fraction=0: there is no validation data; set a fraction > 0 or data.validation_split"
        )
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(data_cfg)
    if data_cfg.source == "hf" and data_cfg.streaming:
        dataset = load_hf_part(data_cfg, VALIDATION)
        return StreamingValidationLoader(
            dataset, data_cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, num_batches
        )
    corpus = build_token_corpus(data_cfg, tokenizer, VALIDATION)
    return PackedValidationLoader(corpus, data_cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, num_batches)


def build_loaders(
    cfg: Any,
    tokenizer: Optional[Tokenizer] = None,
    micro_batch_size: int = 1,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    seed: int = 0,
    val_num_batches: Optional[int] = None,
) -> tuple[TrainLoader, Optional[ValidationLoader]]:
    """``(train_loader, val_loader)``; the validation loader is None when the config asks for none."""
    data_cfg = DataConfig.from_mapping(cfg)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(data_cfg)
    train = build_train_loader(data_cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, seed)
    val = None
    if has_validation_data(data_cfg):
        val = build_val_loader(data_cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, val_num_batches)
    return train, val
