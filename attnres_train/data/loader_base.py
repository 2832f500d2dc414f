"""What every training loader shares: batch layout, sharding arguments, resume state and its fingerprint.

Sharding: the *global* sample sequence depends only on the data, the tokenizer and the seed (and, for a
mixture, on the samples per optimizer step), never on how the samples are split between data-parallel ranks.
Each call consumes one global batch of ``G = micro_batch_size * dp_world_size`` consecutive samples of that
sequence and rank ``r`` takes samples ``[r*B, (r+1)*B)`` of it. One process with micro batch ``2B`` therefore
sees exactly the rows that two ranks with micro batch ``B`` see together.

Resume: ``state_dict()`` records the position and a fingerprint of everything that decides the sample
sequence; ``load_state_dict`` refuses a state saved for another sequence and names what differs.

Shape legend: B micro batch (rows per rank per call), T seq_len, W = T + 1 window length.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from attnres_train.model.packing import doc_ids_from_eos

from .config import DataConfig
from .tokenizer import Tokenizer

STATE_VERSION = 2


class DataStateError(ValueError):
    """A loader state dict does not fit this loader (different data, tokenizer, seed or a malformed dict)."""


def make_batch(windows_BW: np.ndarray, eos_token_id: int) -> dict[str, torch.Tensor]:
    """Windows ``[B, T + 1]`` -> ``{"input_ids", "labels", "doc_ids"}``, each a LongTensor ``[B, T]``:
    labels are the inputs shifted by one, and doc ids restart after every EOS so mixers keep packed
    documents apart."""
    window_BW = torch.from_numpy(np.ascontiguousarray(windows_BW, dtype=np.int64))
    input_ids_BT = window_BW[:, :-1].contiguous()
    labels_BT = window_BW[:, 1:].contiguous()
    return {"input_ids": input_ids_BT, "labels": labels_BT, "doc_ids": doc_ids_from_eos(input_ids_BT, eos_token_id)}


def summary_of(cfg: DataConfig, tokenizer: Tokenizer, seed: int, **extra: Any) -> dict:
    """Everything that decides the sample sequence, flat and JSON-able (kept in the state for messages)."""
    out = {f"data.{k}": v for k, v in cfg.stream_fields().items()}
    out.update({"tokenizer": tokenizer.identity, "seed": seed, **extra})
    return json.loads(json.dumps(out, default=str))


def fingerprint_of(summary: dict) -> str:
    return hashlib.blake2b(json.dumps(summary, sort_keys=True).encode("utf-8"), digest_size=16).hexdigest()


def check_parallel_arguments(micro_batch_size: int, dp_rank: int, dp_world_size: int) -> None:
    for name, value, low in (("micro_batch_size", micro_batch_size, 1), ("dp_world_size", dp_world_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_world_size:
        raise ValueError(f"dp_rank={dp_rank!r}: expected an integer in [0, dp_world_size={dp_world_size})")


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected an integer >= 0")


def epoch_seed_sequence(seed: int, epoch: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, epoch])


class ShardedTrainLoader:
    """Shared bookkeeping of the training loaders: sharding arguments, iterator protocol, state checks."""

    kind = "abstract"

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int, dp_rank: int,
                 dp_world_size: int, seed: int, summary: dict):
        check_parallel_arguments(micro_batch_size, dp_rank, dp_world_size)
        check_seed(seed)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.seed = seed
        self.samples_consumed = 0  # global samples (all ranks) handed out so far
        self._summary_dict = summary
        self.fingerprint = fingerprint_of(summary)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_world_size

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    def __iter__(self) -> "ShardedTrainLoader":
        return self

    def _base_state(self) -> dict:
        return {
            "version": STATE_VERSION,
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
        if state.get("kind") == "packed" or state.get("version") == 1:
            raise DataStateError(
                "data loader state was saved by an earlier version of the data loader (state version 1), whose "
                "sample order differs from this version's; start a new run (train.resume=never, or a new run_dir)"
            )
        def require(keys) -> None:
            missing = [k for k in keys if k not in state]
            if missing:
                raise DataStateError(f"data loader state is missing {missing} (keys: {sorted(state)})")

        require(("version", "kind", "fingerprint"))
        if state["version"] != STATE_VERSION:
            raise DataStateError(f"data loader state version {state['version']!r}, expected {STATE_VERSION}")
        if state["kind"] != self.kind:
            raise DataStateError(
                f"data loader state was saved by a {state['kind']} loader, this one is {self.kind} "
                "(did data.source or data.streaming change?)"
            )
        require(required)
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
