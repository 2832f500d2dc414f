"""The prepared dataset format and its memory-mapped reader.

A prepared dataset is a directory written once by ``attnres-prepare`` (``prepare.py``) and read by every
training run:

* ``manifest.json`` -- written last and atomically, so its presence means every shard it lists is complete:
  format and version, tokenizer identity / vocab size / EOS id, token dtype, what the documents came from, the
  train/validation split rule, and per part (``train``, ``validation``) the document and token counts and the
  shard list with each file's size and SHA-256.
* ``<part>-<chunk>.tokens.npy`` -- 1-D ``uint16`` (vocab <= 65,536) or ``uint32`` token ids,
  ``doc EOS doc EOS ...``; concatenated in shard order the shards of a part are that part's token stream.
* ``<part>-<chunk>.docs.npy`` -- 1-D ``int64`` document index: the end offset (exclusive, EOS included) of
  every document within its shard.

Reading costs O(number of shards) at start-up (manifest, ``stat`` of each file) and nothing per token: shards
are memory-mapped on first use, so resident memory is the pages actually touched, shared through the OS page
cache by every rank of a node. Checksums: a shard whose size differs from the manifest is refused at once; its
SHA-256 is recomputed when its modification time differs from the one recorded at preparation (or at the last
verification), or always with ``verify="always"``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attnres_train.atomic_files import atomic_write_bytes, atomic_write_json

from .config import DataConfigError

FORMAT_NAME = "attnres-prepared-tokens"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VERIFIED_NAME = "verified.json"
VERIFY_MODES = ("auto", "always", "never")
_OPEN_SHARDS = 64  # memory maps kept open per part (each holds a file descriptor)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id (uint16 for the byte tokenizer and most BPE vocabularies)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sha256_of_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_bytes_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def write_json_atomically(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload, indent=1, sort_keys=True)


@dataclass(frozen=True)
class ShardFile:
    path: Path
    size_bytes: int
    sha256: str
    mtime_ns: int


@dataclass(frozen=True)
class Shard:
    tokens: ShardFile
    documents: ShardFile
    num_tokens: int
    num_documents: int


class PreparedPart:
    """One part (train or validation) of a prepared dataset: one token stream over its shards, read by
    memory map. ``read(start, length)`` and ``windows`` copy only the tokens asked for."""

    def __init__(self, root: Path, part: str, shards: list[Shard], dtype: np.dtype):
        self.root = root
        self.part = part
        self.shards = shards
        self.dtype = dtype
        counts = np.array([s.num_tokens for s in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # token offset of each shard
        self.num_tokens = int(self.offsets[-1])
        self.num_documents = int(sum(s.num_documents for s in shards))
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __repr__(self) -> str:
        return f"PreparedPart({str(self.root)!r}, {self.part!r}, tokens={self.num_tokens}, shards={len(self.shards)})"

    def _shard_tokens(self, index: int) -> np.ndarray:
        tokens = self._maps.get(index)
        if tokens is None:
            shard = self.shards[index]
            try:
                tokens = np.load(shard.tokens.path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DataConfigError(f"prepared shard {shard.tokens.path}: cannot be read ({exc})") from exc
            if tokens.dtype != self.dtype or tokens.shape != (shard.num_tokens,):
                raise DataConfigError(
                    f"prepared shard {shard.tokens.path}: holds {tokens.dtype} {tokens.shape}, the manifest says "
                    f"{self.dtype} ({shard.num_tokens},)"
                )
            self._maps[index] = tokens
            if len(self._maps) > _OPEN_SHARDS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(index)
        return tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the part's stream (crossing shard boundaries) as int64."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.num_tokens}) of {self!r}")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            begin = start + filled - int(self.offsets[shard])
            take = min(length - filled, self.shards[shard].num_tokens - begin)
            if take > 0:
                out[filled : filled + take] = self._shard_tokens(shard)[begin : begin + take]
                filled += take
            shard += 1
        return out

    def num_windows(self, seq_len: int) -> int:
        """Packed samples of ``seq_len + 1`` tokens at stride ``seq_len`` (consecutive ones share a token)."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def windows(self, window_index: np.ndarray, seq_len: int) -> np.ndarray:
        """Windows ``[len(window_index), seq_len + 1]`` (int64): window ``i`` is tokens ``[i*T, i*T + T + 1)``."""
        window_index = np.asarray(window_index, dtype=np.int64)
        out = np.empty((window_index.size, seq_len + 1), dtype=np.int64)
        for row, index in enumerate(window_index):
            out[row] = self.read(int(index) * seq_len, seq_len + 1)
        return out

    def document_ends(self) -> np.ndarray:
        """End offset of every document in the part's stream (reads every shard's index: for tools and tests)."""
        ends = [np.load(s.documents.path) + self.offsets[i] for i, s in enumerate(self.shards)]
        return np.concatenate(ends) if ends else np.empty(0, dtype=np.int64)


class PreparedDataset:
    """A prepared dataset directory, checked on open: manifest, shard presence and sizes, and checksums of the
    shards whose files changed since they were written (``verify``: auto | always | never)."""

    def __init__(self, path: str | os.PathLike, verify: str = "auto", blame: str = "data.path"):
        if verify not in VERIFY_MODES:
            raise DataConfigError(f"data.verify_shards={verify!r}: expected one of {VERIFY_MODES}")
        self.root = Path(path).expanduser().resolve()
        self.blame = blame
        self.manifest = read_manifest(self.root, blame)
        self.tokenizer = self.manifest["tokenizer"]
        self.dtype = np.dtype(self.manifest["token_dtype"])
        self.parts = {name: PreparedPart(self.root, name, self._shards(name), self.dtype) for name in ("train", "validation")}
        self._check_files(verify)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer["eos_token_id"])

    @property
    def content_id(self) -> str:
        """Changes whenever any shard's content does: identifies the data in resume fingerprints."""
        checksums = [[f["tokens"]["sha256"] for f in self.manifest["parts"][p]["shards"]] for p in ("train", "validation")]
        return hashlib.blake2b(json.dumps(checksums).encode(), digest_size=12).hexdigest()

    def part(self, name: str) -> PreparedPart:
        return self.parts[name]

    def _shards(self, part: str) -> list[Shard]:
        def file(entry: dict) -> ShardFile:
            return ShardFile(self.root / entry["file"], int(entry["size_bytes"]), str(entry["sha256"]),
                             int(entry["mtime_ns"]))

        return [Shard(file(s["tokens"]), file(s["documents"]), int(s["num_tokens"]), int(s["num_documents"]))
                for s in self.manifest["parts"][part]["shards"]]

    def _check_files(self, verify: str) -> None:
        files = [f for part in self.parts.values() for s in part.shards for f in (s.tokens, s.documents)]
        verified = _read_verified(self.root)
        newly_verified = {}
        for f in files:
            try:
                stat = os.stat(f.path)
            except FileNotFoundError:
                raise DataConfigError(
                    f"{self.blame}={str(self.root)!r}: shard {f.path} listed in the manifest is missing"
                ) from None
            if stat.st_size != f.size_bytes:
                raise DataConfigError(
                    f"prepared shard {f.path}: {stat.st_size} bytes, the manifest says {f.size_bytes} "
                    "(truncated or replaced); prepare the dataset again"
                )
            unchanged = stat.st_mtime_ns in (f.mtime_ns, verified.get(f.path.name))
            if verify == "always" or (verify == "auto" and not unchanged):
                if sha256_of_file(f.path) != f.sha256:
                    raise DataConfigError(
                        f"prepared shard {f.path}: checksum does not match the manifest (the file is corrupt or "
                        "was modified); prepare the dataset again"
                    )
                if not unchanged:
                    newly_verified[f.path.name] = stat.st_mtime_ns
        if newly_verified:  # a copied dataset (new mtimes) is hashed once, not at every launch
            try:
                write_json_atomically(self.root / VERIFIED_NAME, {**verified, **newly_verified})
            except OSError:
                pass  # read-only dataset directory: verified again next time


def _read_verified(root: Path) -> dict:
    try:
        payload = json.loads((root / VERIFIED_NAME).read_text())
        return payload if isinstance(payload, dict) else {}
    except (OSError, ValueError):
        return {}


def read_manifest(root: Path, blame: str = "data.path") -> dict:
    """The manifest of a prepared dataset directory, checked for format, version and required keys."""
    where = f"{blame}={str(root)!r}"
    if not root.exists():
        raise DataConfigError(f"{where}: no such directory (expected a dataset written by attnres-prepare)")
    if not root.is_dir():
        raise DataConfigError(f"{where}: is a file, expected a prepared dataset directory")
    path = root / MANIFEST_NAME
    if not path.exists():
        hint = ("its preparation did not finish: run the same attnres-prepare command again to complete it"
                if any(root.glob("*.npy")) or (root / ".progress").exists()
                else "expected a dataset written by attnres-prepare")
        raise DataConfigError(f"{where}: has no {MANIFEST_NAME} ({hint})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataConfigError(f"{path}: not a readable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DataConfigError(f"{path}: not an {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataConfigError(
            f"{path}: format version {manifest.get('format_version')!r}, this version reads {FORMAT_VERSION}; "
            "prepare the dataset again"
        )
    try:
        for key in ("vocab_size", "eos_token_id", "identity"):
            manifest["tokenizer"][key]
        np.dtype(manifest["token_dtype"])
        for part in ("train", "validation"):
            for shard in manifest["parts"][part]["shards"]:
                for key in ("file", "size_bytes", "sha256", "mtime_ns"):
                    shard["tokens"][key], shard["documents"][key]
                shard["num_tokens"], shard["num_documents"]
    except (KeyError, TypeError) as exc:
        raise DataConfigError(f"{path}: malformed manifest (missing {exc})") from exc
    return manifest


def check_tokenizer_matches(dataset: PreparedDataset, tokenizer: Any, tokenizer_field: str = "data.tokenizer") -> None:
    """Refuse a dataset tokenized by another tokenizer than the run's (the ids would mean other text)."""
    saved = dataset.tokenizer
    if saved["identity"] != tokenizer.identity:
        raise DataConfigError(
            f"{dataset.blame}={str(dataset.root)!r} was tokenized with {saved.get('name', '?')!r} "
            f"(identity {saved['identity']}, vocab {saved['vocab_size']}), but {tokenizer_field} gives "
            f"identity {tokenizer.identity} (vocab {tokenizer.vocab_size}); set {tokenizer_field} to the "
            "tokenizer the dataset was prepared with"
        )

