"""Training and validation batches packed on the fly from a streaming ``datasets.IterableDataset``.

For quick starts on data that is not prepared: nothing is tokenized up front and memory stays small. The
price is resume: the saved epoch is re-read and re-tokenized up to the saved position, which costs time
proportional to that position (minutes per billion tokens). Prepare the data (``attnres-prepare``) for
long runs: a prepared dataset resumes in constant time.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from .config import DataConfig, DataConfigError
from .loader_base import (
    DataStateError,
    ShardedTrainLoader,
    check_parallel_arguments,
    epoch_seed_sequence,
    make_batch,
    summary_of,
)
from .tokenizer import Tokenizer

_ENCODE_CHUNK = 64  # documents per tokenizer call while streaming (batch calls are much faster for HF)


def pack_windows(documents: Iterable[Optional[str]], tokenizer: Tokenizer, seq_len: int) -> Iterator[np.ndarray]:
    """Windows ``[seq_len + 1]`` (int64) of the stream ``doc EOS doc EOS ...``, cut exactly as
    a prepared part's windows cut the same documents; empty documents are skipped, the partial tail dropped."""
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


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class StreamingTrainLoader(ShardedTrainLoader):
    """Infinite training batches packed on the fly from a streaming ``IterableDataset``.

    Every rank reads the whole stream and keeps its own rows of each global batch, so the global sequence
    does not depend on the number of ranks. Resume re-reads the saved epoch up to the saved position.
    """

    kind = "streaming"

    def __init__(self, dataset: Any, cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int,
                 dp_rank: int, dp_world_size: int, seed: int):
        super().__init__(cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, seed, summary_of(cfg, tokenizer, seed))
        self.dataset = dataset
        self.epoch = 0
        self.samples_in_epoch = 0  # windows of the current epoch already consumed (by all ranks)
        self._windows: Optional[Iterator[np.ndarray]] = None

    def _epoch_windows(self, epoch: int) -> Iterator[np.ndarray]:
        epoch_seed = int(epoch_seed_sequence(self.seed, epoch).generate_state(1)[0])
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


class StreamingValidationLoader:
    """Finite validation batches read in order from a streaming dataset (no shuffle): the same windows the
    in-memory loader would give. ``num_batches`` None reads the whole part (incomplete last batch dropped)."""

    def __init__(self, dataset: Any, cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int,
                 dp_rank: int, dp_world_size: int, num_batches: Optional[int] = None):
        check_parallel_arguments(micro_batch_size, dp_rank, dp_world_size)
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
