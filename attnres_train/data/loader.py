"""Training and validation batches from prepared (memory-mapped) token shards, one source or a mixture.

Every non-streaming source goes through here: ``data.source=prepared`` names prepared directories, and the
stdlib and non-streaming hf sources are prepared into the cache on first use (``prepare.ensure_prepared``).

Packing: a part's token stream is ``doc EOS doc EOS ...``; window ``i`` is ``stream[i*T : i*T + T + 1]``
(consecutive windows share one token, so every token is a label exactly once).

Order: source ``s`` hands out its ``j``-th sample as window ``perm(seed, s, epoch)(j mod N_s)`` with
``epoch = j // N_s``, a keyed permutation evaluated per index (``permutation.py``): no per-epoch array, no
pass over the corpus at start-up, and any position is reached by arithmetic. Each source epochs on its own.

Mixture: an optimizer step draws ``step_size = micro_batch * dp_world * grad_accum`` samples; source ``s``
gets ``floor(step_size * w_s)`` or one more, the extra ones going to the sources furthest behind their share
of everything drawn so far, and the step's samples are interleaved by a seeded shuffle. The state is the
number of samples each source has handed out, so resume is O(1) at any position; with one source the sample
sequence does not depend on the step size at all, and a run may resume on another number of ranks.

Validation: each source scores a fixed sample of its validation windows spread over the whole held-out set
(the same windows for every run with the same batch shape, whatever the seed), in order of position.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from .config import DataConfig, DataConfigError
from .loader_base import (
    DataStateError,
    ShardedTrainLoader,
    check_parallel_arguments,
    check_seed,
    make_batch,
    summary_of,
)
from .permutation import IndexPermutation
from .prepare import ensure_prepared
from .prepared import PreparedDataset, PreparedPart, check_tokenizer_matches
from .sources import TRAIN, VALIDATION, load_hf_part
from .streaming import StreamingTrainLoader, StreamingValidationLoader
from .tokenizer import Tokenizer, build_tokenizer

_MIX_SALT = 0x6D6978  # keys the in-step interleaving apart from the window order
_VALIDATION_SAMPLE_KEY = (0x76616C,)
_PERMUTATION_BLOCK = 4096  # window indices evaluated per permutation call  # fixed: every run of a sweep scores the same validation windows


@dataclass
class PreparedSource:
    """One prepared dataset as a data source: its name in metrics, mixture weight and where it came from."""

    name: str
    weight: float
    dataset: PreparedDataset
    blame: str  # the config field naming it, for messages

    def part(self, part: str) -> PreparedPart:
        return self.dataset.part(part)


def open_sources(cfg: Any, tokenizer: Optional[Tokenizer] = None) -> list[PreparedSource]:
    """The prepared sources of a non-streaming ``data`` config, opened and checked against the tokenizer
    (stdlib / hf sources are prepared into the cache first if needed)."""
    data_cfg = DataConfig.from_mapping(cfg)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(data_cfg)
    if data_cfg.source != "prepared":
        if data_cfg.streaming:
            raise DataConfigError("data.streaming=true: a streaming source is read as it streams, not prepared")
        path = ensure_prepared(data_cfg, tokenizer)
        dataset = PreparedDataset(path, data_cfg.verify_shards, blame=f"prepared cache of data.source={data_cfg.source!r}")
        return [PreparedSource(data_cfg.source, 1.0, dataset, f"data.source={data_cfg.source!r}")]
    sources = []
    for i, (name, path, weight) in enumerate(data_cfg.mixture_sources()):
        blame = "data.path" if data_cfg.path is not None else f"data.mixture[{i}].path"
        dataset = PreparedDataset(path, data_cfg.verify_shards, blame=blame)
        check_tokenizer_matches(dataset, tokenizer)
        sources.append(PreparedSource(name, weight, dataset, blame))
    return sources


def apportion(step_size: int, weights: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """Samples per source for the next step: ``floor(step_size * w)`` each, and the remainder one each to
    the sources furthest behind ``w * (everything drawn after this step)``, ties to the earlier source."""
    base = np.floor(weights * step_size).astype(np.int64)
    remaining = step_size - int(base.sum())
    behind = weights * float(drawn.sum() + step_size) - drawn - base
    behind[weights == 0] = -np.inf
    order = np.lexsort((np.arange(weights.size), -behind))
    base[order[:remaining]] += 1
    return base


class PreparedTrainLoader(ShardedTrainLoader):
    """Infinite, sharded, exactly resumable training batches from one or several prepared sources."""

    kind = "prepared"

    def __init__(self, sources: list[PreparedSource], cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int,
                 dp_rank: int, dp_world_size: int, seed: int, grad_accum_steps: int = 1):
        if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps={grad_accum_steps!r}: expected a positive integer")
        summary = summary_of(cfg, tokenizer, seed,
                             sources={s.name: s.dataset.content_id for s in sources})
        super().__init__(cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, seed, summary)
        self.sources = sources
        self.parts = [s.part(TRAIN) for s in sources]
        self.windows_per_source = np.array([p.num_windows(cfg.seq_len) for p in self.parts], dtype=np.int64)
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        for source, windows, weight in zip(sources, self.windows_per_source, self.weights):
            if windows == 0 and weight > 0:
                raise DataConfigError(
                    f"{source.blame}={str(source.dataset.root)!r}: its training data has "
                    f"{source.part(TRAIN).num_tokens} tokens, fewer than data.seq_len + 1 = {cfg.seq_len + 1}; "
                    "lower data.seq_len or use more documents"
                )
        self.step_size = self.global_batch_size * grad_accum_steps
        self.source_samples = np.zeros(len(sources), dtype=np.int64)  # drawn from each source before this step
        self._step_start = 0  # samples_consumed when the current step began
        self._plan: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._permutations: dict[tuple[int, int], IndexPermutation] = {}
        self._blocks: dict[tuple[int, int, int], np.ndarray] = {}

    def _permutation(self, source: int, epoch: int) -> IndexPermutation:
        key = (source, epoch)
        if key not in self._permutations:
            if len(self._permutations) >= 16:
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[key] = IndexPermutation(int(self.windows_per_source[source]),
                                                       (self.seed, source, epoch))
        return self._permutations[key]

    def _step_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample number within that source) of every sample of the current step."""
        if self._plan is None:
            counts = apportion(self.step_size, self.weights, self.source_samples)
            source_of = np.repeat(np.arange(len(self.sources)), counts)
            if len(self.sources) > 1:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, _MIX_SALT, self._step_start]))
                source_of = source_of[rng.permutation(source_of.size)]
            sample_of = np.empty_like(source_of)
            for s in range(len(self.sources)):
                chosen = source_of == s
                sample_of[chosen] = self.source_samples[s] + np.arange(int(chosen.sum()))
            self._plan = (source_of, sample_of)
        return self._plan

    def global_samples(self, first: int, count: int) -> list[tuple[int, int]]:
        """(source, window index) of positions ``first .. first + count - 1`` of the current step."""
        source_of, sample_of = self._step_plan()
        sources = source_of[first : first + count]
        epochs, offsets = np.divmod(sample_of[first : first + count], np.maximum(self.windows_per_source[sources], 1))
        windows = [self._window(int(s), int(e), int(o)) for s, e, o in zip(sources, epochs, offsets)]
        return list(zip(sources.tolist(), windows))

    def _window(self, source: int, epoch: int, offset: int) -> int:
        """``perm(source, epoch)(offset)``. A source hands out consecutive offsets, so the permutation is
        evaluated for a whole aligned block at once and kept: one vectorised call per block, not per sample."""
        block = offset // _PERMUTATION_BLOCK
        key = (source, epoch, block)
        values = self._blocks.get(key)
        if values is None:
            count = int(self.windows_per_source[source])
            begin = block * _PERMUTATION_BLOCK
            values = self._permutation(source, epoch)(np.arange(begin, min(begin + _PERMUTATION_BLOCK, count)))
            if len(self._blocks) >= 4 * len(self.sources):
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[key] = values
        return int(values[offset % _PERMUTATION_BLOCK])

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.samples_consumed - self._step_start + self.dp_rank * self.micro_batch_size
        rows = self.global_samples(first, self.micro_batch_size)
        windows_BW = np.stack([self.parts[s].read(w * self.seq_len, self.seq_len + 1) for s, w in rows])
        self.samples_consumed += self.global_batch_size
        if self.samples_consumed - self._step_start >= self.step_size:
            self.source_samples += np.bincount(self._step_plan()[0], minlength=len(self.sources))
            self._step_start = self.samples_consumed
            self._plan = None
        return make_batch(windows_BW, self.tokenizer.eos_token_id)

    def state_dict(self) -> dict:
        """Samples drawn per source (at the start of the current step), the position within the step and
        the step size: a few integers, whatever the corpus size or position."""
        names = [s.name for s in self.sources]
        epochs = {n: int(c // max(w, 1)) for n, c, w in zip(names, self.source_samples, self.windows_per_source)}
        return {**self._base_state(), "source_samples": dict(zip(names, map(int, self.source_samples))),
                "step_start": self._step_start, "step_size": self.step_size, "epochs": epochs}

    def load_state_dict(self, state: dict) -> None:
        """Continue right after the saved position. At a step boundary the global batch, the number of
        ranks and the mixture weights may all differ from the saved run."""
        self._check_state(state, ("samples_consumed", "source_samples", "step_start", "step_size"))
        saved = state["source_samples"]
        names = [s.name for s in self.sources]
        if sorted(saved) != sorted(names):
            raise DataStateError(f"data loader state has sources {sorted(saved)}, this run has {sorted(names)}")
        mid_step = state["samples_consumed"] != state["step_start"]
        if mid_step and state["step_size"] != self.step_size:
            raise DataStateError(
                f"data loader state stopped inside a step of {state['step_size']} samples; resume it with the same "
                f"global batch (this run's step has {self.step_size})"
            )
        self.samples_consumed = int(state["samples_consumed"])
        self._step_start = int(state["step_start"])
        self.source_samples = np.array([int(saved[n]) for n in names], dtype=np.int64)
        self._plan = None


class PreparedValidationLoader:
    """Finite, fixed validation batches: per source, ``num_batches`` global batches of windows sampled
    evenly over its whole validation part (sorted by position), global batch ``k`` split across ranks.
    ``iter_by_source()`` yields ``(source name, batch)``; iterating yields the batches alone."""

    def __init__(self, sources: list[PreparedSource], cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int,
                 dp_rank: int, dp_world_size: int, num_batches: Optional[int] = None):
        check_parallel_arguments(micro_batch_size, dp_rank, dp_world_size)
        if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"num_batches={num_batches!r}: expected null (all) or a positive integer")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        global_batch = micro_batch_size * dp_world_size
        self.sources: list[PreparedSource] = []
        self._windows: list[np.ndarray] = []  # per source: [batches, global_batch] window indices
        for source in sources:
            part = source.part(VALIDATION)
            if part.num_tokens == 0:
                continue  # prepared without held-out documents: this source is not scored
            available = part.num_windows(cfg.seq_len)
            batches = available // global_batch
            if batches == 0:
                raise DataConfigError(
                    f"{source.blame}={str(source.dataset.root)!r}: the validation data has {part.num_tokens} tokens, "
                    f"fewer than one global batch needs ({global_batch} x data.seq_len {cfg.seq_len} + 1); prepare "
                    "it with a larger data.validation_fraction or lower data.seq_len"
                )
            batches = batches if num_batches is None else min(num_batches, batches)
            chosen = np.sort(IndexPermutation(available, _VALIDATION_SAMPLE_KEY)(np.arange(batches * global_batch)))
            self.sources.append(source)
            self._windows.append(chosen.reshape(batches, global_batch))

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def source_weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    def __len__(self) -> int:
        return sum(w.shape[0] for w in self._windows)

    def iter_by_source(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        own = slice(self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size)
        for source, windows in zip(self.sources, self._windows):
            part = source.part(VALIDATION)
            for batch_windows in windows:
                yield source.name, make_batch(part.windows(batch_windows[own], self.cfg.seq_len),
                                              self.tokenizer.eos_token_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _, batch in self.iter_by_source():
            yield batch


# ----------------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------------
TrainLoader = PreparedTrainLoader | StreamingTrainLoader
ValidationLoader = PreparedValidationLoader | StreamingValidationLoader


def _is_streaming(cfg: DataConfig) -> bool:
    return cfg.source == "hf" and cfg.streaming


def build_train_loader(
    cfg: Any,
    tokenizer: Optional[Tokenizer] = None,
    micro_batch_size: int = 1,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    seed: int = 0,
    grad_accum_steps: int = 1,
    sources: Optional[list[PreparedSource]] = None,
) -> TrainLoader:
    """Infinite, sharded, resumable training batches for data-parallel rank ``dp_rank``.

    ``cfg`` is the ``data`` group (DictConfig, dict or DataConfig); ``tokenizer`` defaults to
    ``build_tokenizer(cfg)``. Each ``next()`` returns ``{"input_ids", "labels", "doc_ids"}`` of shape
    ``[micro_batch_size, seq_len]``.
    """
    data_cfg = DataConfig.from_mapping(cfg)
    check_parallel_arguments(micro_batch_size, dp_rank, dp_world_size)
    check_seed(seed)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(data_cfg)
    if _is_streaming(data_cfg):
        dataset = load_hf_part(data_cfg, TRAIN)
        return StreamingTrainLoader(dataset, data_cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, seed)
    sources = sources if sources is not None else open_sources(data_cfg, tokenizer)
    return PreparedTrainLoader(sources, data_cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, seed,
                               grad_accum_steps)


def has_validation_data(cfg: Any, sources: Optional[list[PreparedSource]] = None) -> bool:
    """Whether there is validation data: a validation split or a held-out fraction, or for prepared data a
    source with held-out tokens."""
    data_cfg = DataConfig.from_mapping(cfg)
    if data_cfg.source == "prepared":
        sources = sources if sources is not None else open_sources(data_cfg)
        return any(s.part(VALIDATION).num_tokens > 0 for s in sources)
    return data_cfg.validation_fraction > 0 or (data_cfg.source == "hf" and data_cfg.validation_split is not None)


def build_val_loader(
    cfg: Any,
    tokenizer: Optional[Tokenizer] = None,
    micro_batch_size: int = 1,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    num_batches: Optional[int] = None,
    sources: Optional[list[PreparedSource]] = None,
) -> ValidationLoader:
    """Finite, deterministic validation batches (per source, ``num_batches`` global batches; rank slice)."""
    data_cfg = DataConfig.from_mapping(cfg)
    check_parallel_arguments(micro_batch_size, dp_rank, dp_world_size)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(data_cfg)
    if not _is_streaming(data_cfg):
        sources = sources if sources is not None else open_sources(data_cfg, tokenizer)
    if not has_validation_data(data_cfg, sources):
        raise DataConfigError(
            "data.validation_fraction=0: there is no validation data; set a fraction > 0 or data.validation_split"
            if data_cfg.source != "prepared" else
            "data.path / data.mixture: no source was prepared with validation documents "
            "(prepare with data.validation_fraction > 0)"
        )
    if _is_streaming(data_cfg):
        dataset = load_hf_part(data_cfg, VALIDATION)
        return StreamingValidationLoader(
            dataset, data_cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, num_batches
        )
    return PreparedValidationLoader(sources, data_cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size,
                                    num_batches)


def build_loaders(
    cfg: Any,
    tokenizer: Optional[Tokenizer] = None,
    micro_batch_size: int = 1,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    seed: int = 0,
    val_num_batches: Optional[int] = None,
    grad_accum_steps: int = 1,
) -> tuple[TrainLoader, Optional[ValidationLoader]]:
    """``(train_loader, val_loader)``; the validation loader is None when there is no validation data."""
    data_cfg = DataConfig.from_mapping(cfg)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(data_cfg)
    sources = None if _is_streaming(data_cfg) else open_sources(data_cfg, tokenizer)
    train = build_train_loader(data_cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, seed,
                               grad_accum_steps, sources)
    val = None
    if has_validation_data(data_cfg, sources):
        val = build_val_loader(data_cfg, tokenizer, micro_batch_size, dp_rank, dp_world_size, val_num_batches,
                               sources)
    return train, val
