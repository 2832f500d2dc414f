"""Tokenizers behind one small interface: ``encode``, ``encode_batch``, ``decode``, ``vocab_size``,
``eos_token_id`` and ``identity`` (a string that changes whenever the token ids would; used by the resume
fingerprint and the token cache).

``ByteTokenizer`` needs nothing: ids 0..255 are UTF-8 bytes, 256 is EOS, 257 is PAD. ``HFTokenizer`` wraps
``transformers.AutoTokenizer`` (imported only when asked for) and guarantees an EOS id, adding
``<|endoftext|>`` when the tokenizer has none.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Protocol, Sequence

import numpy as np

from .config import DataConfig, DataConfigError

_TRUE_STRINGS = ("1", "true", "yes", "on")


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int

    @property
    def identity(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is EOS, 257 is PAD (vocab_size 258)."""

    vocab_size = 258
    eos_token_id = 256
    pad_token_id = 257
    identity = "byte-utf8-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_documents_to_array(self, texts: Sequence[str]) -> np.ndarray:
        """Non-empty texts as one uint16 array ``doc EOS doc EOS ...`` without per-byte Python work."""
        encoded = [t.encode("utf-8") for t in texts if t]  # empty documents are skipped, as everywhere
        out = np.empty(sum(len(b) for b in encoded) + len(encoded), dtype=np.uint16)
        position = 0
        for data in encoded:  # one slice copy per document (no large int64 index arrays)
            out[position : position + len(data)] = np.frombuffer(data, dtype=np.uint8)
            position += len(data)
            out[position] = self.eos_token_id
            position += 1
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; EOS / PAD are dropped and broken UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded by ``AutoTokenizer.from_pretrained(name_or_path)``.

    ``vocab_size`` is ``len(tokenizer)`` (base vocabulary plus added tokens), so every id it emits fits.
    Documents are encoded without special tokens; the loader inserts ``eos_token_id`` between them.
    """

    def __init__(self, name_or_path: str):
        self.name_or_path = name_or_path
        self._tokenizer = _load_hf_tokenizer(name_or_path)
        if self._tokenizer.eos_token_id is None:
            # Packing needs a separator; one new special token is the least surprising choice.
            self._tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
        self.eos_token_id = int(self._tokenizer.eos_token_id)
        self.vocab_size = len(self._tokenizer)
        self._identity: str | None = None

    @property
    def hf_tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def identity(self) -> str:
        if self._identity is None:
            vocab = json.dumps(sorted(self._tokenizer.get_vocab().items()), ensure_ascii=False)
            digest = hashlib.blake2b(vocab.encode("utf-8"), digest_size=8).hexdigest()
            # Not the path: the same tokenizer saved in another directory gives the same ids.
            self._identity = f"hf:{self.vocab_size}:{self.eos_token_id}:{digest}"
        return self._identity

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # verbose=False: documents longer than model_max_length are expected here (they get packed).
        out = self._tokenizer(list(texts), add_special_tokens=False, verbose=False)
        return [list(ids) for ids in out["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def build_tokenizer(cfg: Any) -> ByteTokenizer | HFTokenizer:
    """Tokenizer named by ``data.tokenizer``: ``"byte"`` or a Hugging Face name / local directory."""
    data_cfg = DataConfig.from_mapping(cfg)
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    return HFTokenizer(data_cfg.tokenizer)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_STRINGS


def looks_like_local_path(value: str) -> bool:
    """A value meant as a filesystem path: absolute, relative with ./ ../ ~, or already existing."""
    return value.startswith(("/", "./", "../", "~", ".\\")) or os.path.exists(os.path.expanduser(value))


def _load_hf_tokenizer(name_or_path: str) -> Any:
    where = f"data.tokenizer={name_or_path!r}"
    local = looks_like_local_path(name_or_path)
    path = os.path.expanduser(name_or_path)
    if local and not os.path.isdir(path):
        raise DataConfigError(
            f"{where}: no such local tokenizer directory (expected 'byte', a directory written by "
            "save_pretrained, or a Hugging Face hub name)"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise DataConfigError(
            f"{where}: Hugging Face tokenizers need the 'transformers' package (pip install 'attnres-train[hf]'); "
            "use data.tokenizer=byte to run without it"
        ) from exc
    try:
        # HF_HUB_OFFLINE is read by huggingface_hub at import time; passing it explicitly makes a late
        # setting (and any import order) count too, so a missing name fails at once instead of retrying.
        return AutoTokenizer.from_pretrained(path if local else name_or_path, local_files_only=_hub_offline() or local)
    except Exception as exc:  # the hub raises OSError, ValueError, HTTP errors... all mean "cannot load"
        hint = (
            "not found in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            if _hub_offline() and not local
            else "could not be loaded"
        )
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataConfigError(
            f"{where}: {hint} ({type(exc).__name__}: {reason}). "
            "Expected 'byte', a local tokenizer directory, or a hub name available offline"
        ) from exc
