"""Tests of the data pipeline: tokenizers, sources, packing, sharding and exact resume.

References are computed independently in the tests (plain Python loops over bytes, hashlib, json) rather
than by calling the code under test twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attnres_train.data import (
    ByteTokenizer,
    DataConfig,
    DataConfigError,
    DataStateError,
    PreparedTrainLoader,
    build_tokenizer,
    build_train_loader,
    build_val_loader,
    list_stdlib_files,
    make_batch,
    open_sources,
    prepare_dataset,
    stdlib_part_files,
    stdlib_root,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
EOS = 256
SMALL_STDLIB = dict(source="stdlib", seq_len=64, max_documents=25)


def reference_stream(texts: list[str]) -> list[int]:
    """``doc EOS doc EOS ...`` byte ids, empty documents skipped: the packing contract written out by hand."""
    out: list[int] = []
    for text in texts:
        if text:
            out.extend(text.encode("utf-8"))
            out.append(EOS)
    return out


def reference_doc_ids(row: list[int], eos: int) -> list[int]:
    ids, current = [], 0
    for t, token in enumerate(row):
        if t > 0 and row[t - 1] == eos:
            current += 1
        ids.append(current)
    return ids


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def part_tokens(cfg, part: str) -> list[int]:
    """The whole token stream of one part of the (prepared) data of ``cfg``."""
    prepared = open_sources(cfg)[0].part(part)
    return prepared.read(0, prepared.num_tokens).tolist()


def synthetic_prepared(tmp_path: Path, num_windows: int, seq_len: int, seed: int = 0) -> tuple[DataConfig, dict]:
    """A prepared dataset of random ASCII documents (windows distinct with overwhelming probability) and a
    lookup from a window's bytes to its index."""
    rng = np.random.default_rng(seed)
    texts, total = [], 0
    while total < num_windows * seq_len + 1:
        text = "".join(map(chr, rng.integers(33, 127, size=int(rng.integers(5, 40)))))
        texts.append(text)
        total += len(text) + 1
    source = tmp_path / f"synthetic-{seed}.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / f"synthetic-{seed}"
    prepare_dataset({"source": "hf", "hf_data_files": str(source), "validation_fraction": 0.0,
                     "cache_dir": str(tmp_path / "hf_cache")}, out, num_workers=0, progress=False)
    cfg = DataConfig(source="prepared", path=str(out), seq_len=seq_len)
    stream = reference_stream(texts)
    count = (len(stream) - 1) // seq_len
    lookup = {np.array(stream[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64).tobytes(): i
              for i in range(count)}
    assert len(lookup) == count, "synthetic windows must be distinct"
    return cfg, lookup


def rows_to_window_ids(batches: list[dict], lookup: dict[bytes, int]) -> list[int]:
    ids = []
    for batch in batches:
        full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy().astype(np.int64)
        ids.extend(lookup[row.tobytes()] for row in full)
    return ids


# ----------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(source="web"), "data.source"),
        (dict(seq_len=0), "data.seq_len"),
        (dict(validation_fraction=1.0), "data.validation_fraction"),
        (dict(max_documents=0), "data.max_documents"),
        (dict(num_workers=-1), "data.num_workers"),
        (dict(tokenizer=""), "data.tokenizer"),
        (dict(source="hf"), "data.hf_dataset"),
        (dict(source="hf", hf_data_files="corpus.xyz"), "data.hf_data_files"),
        (dict(source="hf", hf_data_files=["a.jsonl", "b.parquet"]), "data.hf_data_files"),
        (dict(source="hf", hf_dataset="x", validation_split="train"), "data.validation_split"),
        (dict(bogus_key=1), "data.bogus_key"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(DataConfigError, match=field.replace(".", r"\.")):
        DataConfig.from_mapping(overrides)


def test_yaml_groups_match_the_schema():
    from omegaconf import OmegaConf

    field_names = [f.name for f in dataclasses.fields(DataConfig)]
    for name in ("stdlib", "hf"):
        loaded = OmegaConf.load(REPO_ROOT / "configs" / "data" / f"{name}.yaml")
        assert sorted(loaded.keys()) == sorted(field_names)
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), loaded)  # typed: a wrong type would raise
        assert merged.source == name
    # The way a command line overrides a list-or-string field, then validation.
    hf = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        OmegaConf.load(REPO_ROOT / "configs" / "data" / "hf.yaml"),
        OmegaConf.from_dotlist(["hf_data_files=[a.jsonl,b.jsonl]", "seq_len=128"]),
    )
    cfg = DataConfig.from_mapping(hf)
    assert cfg.hf_data_files == ["a.jsonl", "b.jsonl"] and cfg.seq_len == 128
    DataConfig.from_mapping(OmegaConf.load(REPO_ROOT / "configs" / "data" / "stdlib.yaml"))


# ----------------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip_and_vocab():
    tok = build_tokenizer({"tokenizer": "byte"})
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_token_id, tok.pad_token_id) == (258, 256, 257)
    text = "def f(x):\n    return x  # ünïcödé, 漢字, emoji 🙂\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids[:5] + [tok.eos_token_id, tok.pad_token_id] + ids[5:]) == text  # specials dropped
    texts = ["abc", "", "π", "line\nbreak"]
    assert tok.encode_documents_to_array(texts).tolist() == reference_stream(texts)


def test_hf_tokenizer_from_local_directory(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    # A tiny byte-level BPE trained here: no download, and it has no EOS, so the wrapper must add one.
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["def foo(bar): return bar + 1"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "tok")

    tok = build_tokenizer({"tokenizer": str(tmp_path / "tok")})
    assert tok.eos_token_id is not None and 0 <= tok.eos_token_id < tok.vocab_size
    text = "def foo(bar): return bar + 1\nprint('ok')"
    ids = tok.encode(text)
    assert ids and max(ids) < tok.vocab_size and tok.eos_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]

    # Packing with it: the corpus is the documents' ids joined by its EOS.
    data = tmp_path / "docs.jsonl"
    docs = ["def a(): pass", "return bar", "print(1)"]
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(source="hf", hf_data_files=str(data), tokenizer=str(tmp_path / "tok"), seq_len=4,
                     validation_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    expected = [i for d in docs for i in tok.encode(d) + [tok.eos_token_id]]
    assert part_tokens(cfg, "train") == expected
    # The same tokenizer saved elsewhere has the same identity: data prepared with one trains with the other.
    tok.hf_tokenizer.save_pretrained(tmp_path / "tok_copy")
    assert build_tokenizer({"tokenizer": str(tmp_path / "tok_copy")}).identity == tok.identity


def test_tokenizer_errors_name_the_field(tmp_path, monkeypatch):
    with pytest.raises(DataConfigError, match=r"data\.tokenizer=.*no such local tokenizer directory"):
        build_tokenizer({"tokenizer": str(tmp_path / "missing_tokenizer")})
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataConfigError, match=r"data\.tokenizer='no-such-org/no-such-tokenizer'.*HF_HUB_OFFLINE"):
        build_tokenizer({"tokenizer": "no-such-org/no-such-tokenizer"})


# ----------------------------------------------------------------------------------------------------
# stdlib source
# ----------------------------------------------------------------------------------------------------
def test_stdlib_split_is_disjoint_deterministic_and_by_path_hash():
    everything = list_stdlib_files()
    assert everything == sorted(everything) and len(everything) > 500
    assert not any("site-packages" in f.split("/") for f in everything)
    assert all(f.endswith(".py") for f in everything)
    train = stdlib_part_files("train", 0.05)
    val = stdlib_part_files("validation", 0.05)
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == everything
    assert stdlib_part_files("validation", 0.05) == val  # deterministic
    # Independent reference: 8-byte blake2b of the relative path as a fraction of 2**64.
    expected_val = [
        f for f in everything
        if int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "big") / 2**64 < 0.05
    ]
    assert val == expected_val
    assert 0.02 < len(val) / len(everything) < 0.1
    assert stdlib_part_files("train", 0.05, max_documents=7) == train[:7]


def test_full_stdlib_corpus_is_prepared_once_into_the_cache(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    source = open_sources(cfg)[0]
    train, val = source.part("train"), source.part("validation")
    assert train.num_tokens > 10_000_000 and val.num_tokens > 100_000
    assert train.dtype == np.uint16 and source.dataset.root.parent == tmp_path / "prepared"
    first_shard = np.load(train.shards[0].tokens.path, mmap_mode="r")
    assert isinstance(first_shard, np.memmap) and int(first_shard.max()) == EOS
    # A second open reuses the prepared directory: nothing is written again.
    manifest = source.dataset.root / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = open_sources(cfg)[0]
    assert again.dataset.root == source.dataset.root and manifest.stat().st_mtime_ns == before
    assert np.array_equal(again.part("train").read(0, 1000), train.read(0, 1000))


def test_stdlib_corpus_matches_reference_bytes():
    cfg = DataConfig.from_mapping(SMALL_STDLIB)
    root = stdlib_root()
    for part in ("train", "validation"):
        files = stdlib_part_files(part, 0.05, max_documents=25)
        texts = [(root / f).read_bytes().decode("utf-8", errors="replace") for f in files]
        assert part_tokens(cfg, part) == reference_stream(texts)


# ----------------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------------
def test_packing_eos_doc_ids_and_shifted_labels(tmp_path):
    tok = ByteTokenizer()
    texts = ["alpha", "", "be", "gamma delta epsilon", "z", "the last one"]
    seq_len = 6
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    # Two documents per shard: windows cross shard boundaries.
    prepare_dataset({"source": "hf", "hf_data_files": str(source), "validation_fraction": 0.0,
                     "cache_dir": str(tmp_path / "hf")}, tmp_path / "prepared", num_workers=0,
                    shard_text_bytes=6, progress=False)
    corpus = open_sources({"source": "prepared", "path": str(tmp_path / "prepared")})[0].part("train")
    assert len(corpus.shards) == 3
    stream = reference_stream(texts)
    assert corpus.document_ends().tolist() == [i + 1 for i, t in enumerate(stream) if t == EOS]
    n = corpus.num_windows(seq_len)
    assert n == (len(stream) - 1) // seq_len
    batch = make_batch(corpus.windows(np.arange(n), seq_len), tok.eos_token_id)
    for key in ("input_ids", "labels", "doc_ids"):
        assert batch[key].shape == (n, seq_len) and batch[key].dtype == torch.long
    for i in range(n):
        row = stream[i * seq_len : i * seq_len + seq_len + 1]
        assert batch["input_ids"][i].tolist() == row[:-1]
        assert batch["labels"][i].tolist() == row[1:]
        assert batch["doc_ids"][i].tolist() == reference_doc_ids(row[:-1], EOS)
    # Every token is a label exactly once: consecutive windows overlap by one token.
    assert torch.equal(batch["labels"][:-1, -1], batch["input_ids"][1:, 0])
    # EOS sits exactly at each document's end in the stream.
    eos_positions = [i for i, t in enumerate(stream) if t == EOS]
    lengths = [len(t.encode()) for t in texts if t]
    assert eos_positions == list(np.cumsum(np.array(lengths) + 1) - 1)


def test_loader_batches_have_the_packing_contract():
    loader = build_train_loader(SMALL_STDLIB, None, micro_batch_size=4, seed=3)
    for batch in take(loader, 5):
        ids, labels, docs = batch["input_ids"], batch["labels"], batch["doc_ids"]
        assert ids.shape == labels.shape == docs.shape == (4, 64)
        assert torch.equal(labels[:, :-1], ids[:, 1:])
        for row_ids, row_docs in zip(ids.tolist(), docs.tolist()):
            assert row_docs == reference_doc_ids(row_ids, EOS)


# ----------------------------------------------------------------------------------------------------
# epochs, resume, sharding
# ----------------------------------------------------------------------------------------------------
def test_epochs_visit_every_window_once_and_reshuffle(tmp_path):
    seq_len = 16
    cfg, lookup = synthetic_prepared(tmp_path, num_windows=10, seq_len=seq_len)
    n = len(lookup)
    loader = build_train_loader(cfg, micro_batch_size=3, seed=5)
    order = rows_to_window_ids(take(loader, n), lookup)  # 3n samples = three epochs, batches straddle them
    epochs = [order[0:n], order[n : 2 * n], order[2 * n : 3 * n]]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert loader.state_dict()["epochs"] == {cfg.path.rsplit("/", 1)[-1]: 3}
    again = build_train_loader(cfg, micro_batch_size=3, seed=5)
    assert rows_to_window_ids(take(again, n), lookup) == order  # fixed by the seed
    other = build_train_loader(cfg, micro_batch_size=3, seed=6)
    assert rows_to_window_ids(take(other, n), lookup) != order


@pytest.mark.parametrize("stop_after", [1, 3, 4])
def test_resume_is_exact_across_epoch_boundaries(tmp_path, stop_after):
    seq_len = 8
    cfg, lookup = synthetic_prepared(tmp_path, num_windows=7, seq_len=seq_len, seed=1)
    n = len(lookup)
    steps = n + 3  # 2 samples per step: more than one epoch
    reference = take(build_train_loader(cfg, micro_batch_size=2, seed=0), steps)

    first = build_train_loader(cfg, micro_batch_size=2, seed=0)
    before = take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint's serialization
    resumed = build_train_loader(cfg, micro_batch_size=2, seed=0)
    resumed.load_state_dict(state)
    middle = take(resumed, 2)
    # A second resume in a row, from the resumed loader's own state.
    again = build_train_loader(cfg, micro_batch_size=2, seed=0)
    again.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    after = take(again, steps - stop_after - 2)
    assert_batches_equal(before + middle + after, reference)
    # Each epoch a permutation: nothing repeated or skipped across the resumes.
    seen = rows_to_window_ids(before + middle + after, lookup)
    assert sorted(seen[:n]) == list(range(n))


def test_resume_stdlib_loader_and_change_world_size():
    reference = take(build_train_loader(SMALL_STDLIB, None, micro_batch_size=4, seed=11), 6)
    loader = build_train_loader(SMALL_STDLIB, None, micro_batch_size=4, seed=11)
    take(loader, 3)
    state = loader.state_dict()
    assert state["samples_consumed"] == 12 and len(json.dumps(state)) < 4096
    assert isinstance(loader, PreparedTrainLoader)

    fresh = build_train_loader(SMALL_STDLIB, None, micro_batch_size=4, seed=11)
    fresh.load_state_dict(state)
    assert_batches_equal(take(fresh, 3), reference[3:])

    # The position is global: two ranks with micro batch 2 continue the same sequence.
    ranks = [build_train_loader(SMALL_STDLIB, None, micro_batch_size=2, dp_rank=r, dp_world_size=2, seed=11)
             for r in range(2)]
    for rank in ranks:
        rank.load_state_dict(state)
    for step in range(3, 6):
        parts = [next(rank) for rank in ranks]
        for key in reference[step]:
            assert torch.equal(torch.cat([p[key] for p in parts]), reference[step][key])


def test_mismatched_resume_is_detected():
    loader = build_train_loader(SMALL_STDLIB, None, micro_batch_size=2, seed=0)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(DataStateError, match="seed"):
        build_train_loader(SMALL_STDLIB, None, micro_batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(DataStateError, match="data.seq_len"):
        build_train_loader({**SMALL_STDLIB, "seq_len": 32}, None, micro_batch_size=2, seed=0).load_state_dict(state)
    with pytest.raises(DataStateError, match="missing"):
        loader.load_state_dict({"version": 2})
    with pytest.raises(DataStateError, match="earlier version"):
        loader.load_state_dict({**state, "version": 1, "kind": "packed"})


def test_one_rank_equals_two_ranks():
    single = build_train_loader(SMALL_STDLIB, None, micro_batch_size=6, dp_rank=0, dp_world_size=1, seed=2)
    ranks = [build_train_loader(SMALL_STDLIB, None, micro_batch_size=3, dp_rank=r, dp_world_size=2, seed=2)
             for r in range(2)]
    for _ in range(4):
        whole = next(single)
        parts = [next(rank) for rank in ranks]
        assert not torch.equal(parts[0]["input_ids"], parts[1]["input_ids"])
        for key in whole:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])

    val_single = list(build_val_loader(SMALL_STDLIB, None, micro_batch_size=6, num_batches=3))
    val_ranks = [list(build_val_loader(SMALL_STDLIB, None, micro_batch_size=3, dp_rank=r, dp_world_size=2,
                                       num_batches=3)) for r in range(2)]
    assert len(val_single) == 3
    for k in range(3):
        assert torch.equal(torch.cat([val_ranks[0][k]["input_ids"], val_ranks[1][k]["input_ids"]]),
                           val_single[k]["input_ids"])


def test_validation_loader_is_fixed_finite_and_spread_over_the_whole_set():
    val = build_val_loader(SMALL_STDLIB, None, micro_batch_size=4, num_batches=5)
    first, second = list(val), list(val)
    assert len(val) == 5 and len(first) == 5
    assert_batches_equal(first, second)
    # The same windows whatever the training seed or run: they depend on the data and batch shape only.
    assert_batches_equal(list(build_val_loader(SMALL_STDLIB, None, micro_batch_size=4, num_batches=5)), first)
    part = open_sources(SMALL_STDLIB)[0].part("validation")
    total = part.num_windows(64)
    starts = {part.read(i * 64, 65).tobytes(): i for i in range(total)}
    chosen = [starts[np.concatenate([row, labels[-1:]]).astype(np.int64).tobytes()]
              for batch in first for row, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy())]
    assert chosen == sorted(chosen) and len(set(chosen)) == 20
    # Spread: the 20 windows reach into every fifth of the held-out set (the first 20 windows would not).
    assert {w * 5 // total for w in chosen} == {0, 1, 2, 3, 4}
    everything = build_val_loader(SMALL_STDLIB, None, micro_batch_size=4)
    assert len(everything) == total // 4
    with pytest.raises(DataConfigError, match="data.validation_fraction"):
        build_val_loader({**SMALL_STDLIB, "validation_fraction": 0.0}, None)


def test_bad_parallel_arguments():
    with pytest.raises(ValueError, match="dp_rank"):
        build_train_loader(SMALL_STDLIB, None, micro_batch_size=2, dp_rank=2, dp_world_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        build_train_loader(SMALL_STDLIB, None, micro_batch_size=0)


# ----------------------------------------------------------------------------------------------------
# hf source (local files written here)
# ----------------------------------------------------------------------------------------------------
def _documents(count: int) -> list[str]:
    return [f"doc {i}: " + "word " * (i % 5) + ("ü" if i % 3 == 0 else "") for i in range(count)]


def _hf_cfg(tmp_path: Path, **overrides) -> DataConfig:
    base = dict(source="hf", seq_len=16, validation_fraction=0.25, cache_dir=str(tmp_path / "hf_cache"))
    return DataConfig.from_mapping({**base, **overrides})


def _held_out(text: str, fraction: float) -> bool:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64 < fraction


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = _documents(120)
    path.write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return path, docs


def test_hf_jsonl_split_by_text_hash(tmp_path, jsonl_file):
    path, docs = jsonl_file
    cfg = _hf_cfg(tmp_path, hf_data_files=str(path), text_field="body")
    tok = ByteTokenizer()
    expected_val = [d for d in docs if _held_out(d, 0.25)]
    expected_train = [d for d in docs if not _held_out(d, 0.25)]
    assert expected_val and expected_train
    train = part_tokens(cfg, "train")
    assert train == reference_stream(expected_train)
    assert part_tokens(cfg, "validation") == reference_stream(expected_val)
    loader = build_train_loader(cfg, tok, micro_batch_size=2, seed=0)
    batch = next(loader)
    assert batch["input_ids"].shape == (2, 16)
    # hf_dataset may name the file itself.
    assert part_tokens(_hf_cfg(tmp_path, hf_dataset=str(path), text_field="body"), "train") == train


def test_hf_text_and_parquet_files_and_named_splits(tmp_path):
    tok = ByteTokenizer()
    texts = ["first file\nhas two lines", "second file", "third"]
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text(text)
    cfg = _hf_cfg(tmp_path, hf_data_files=[str(f) for f in files], validation_fraction=0.0, seq_len=4)
    assert part_tokens(cfg, "train") == reference_stream(texts)  # text builder: one document per file

    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = _documents(40)
    pq.write_table(pyarrow.table({"text": docs[:30]}), tmp_path / "train.parquet")
    pq.write_table(pyarrow.table({"text": docs[30:]}), tmp_path / "valid.parquet")
    cfg = _hf_cfg(tmp_path, hf_data_files={"train": str(tmp_path / "train.parquet"),
                                           "valid": str(tmp_path / "valid.parquet")},
                  validation_split="valid", max_documents=25)
    assert part_tokens(cfg, "train") == reference_stream(docs[:25])
    assert part_tokens(cfg, "validation") == reference_stream(docs[30:])
    with pytest.raises(DataConfigError, match=r"data\.validation_split='test'"):
        open_sources(dataclasses.replace(cfg, validation_split="test"), tok)


def test_hf_streaming_matches_in_memory_and_resumes(tmp_path, jsonl_file):
    path, _ = jsonl_file
    tok = ByteTokenizer()
    cfg = _hf_cfg(tmp_path, hf_data_files=str(path), text_field="body")
    streaming_cfg = dataclasses.replace(cfg, streaming=True, shuffle_buffer_size=16)

    # Streaming validation reads in order; prepared validation scores a spread sample of the same windows.
    prepared = [b["input_ids"] for b in build_val_loader(cfg, tok, micro_batch_size=1)]
    streamed = [b["input_ids"] for b in build_val_loader(streaming_cfg, tok, micro_batch_size=1)]
    assert len(prepared) >= 3 and len(prepared) == len(streamed)
    assert all(torch.equal(a, b) for a, b in zip(prepared, streamed))  # every window: the same set, in order

    # Training: an epoch is a permutation of documents, packed; resume continues exactly, across epochs.
    train_windows = open_sources(cfg, tok)[0].part("train").num_windows(16)
    steps = train_windows // 3 + 4  # micro batch 3: runs into the second epoch
    reference = take(build_train_loader(streaming_cfg, tok, micro_batch_size=3, seed=4), steps)
    loader = build_train_loader(streaming_cfg, tok, micro_batch_size=3, seed=4)
    before = take(loader, steps - 2)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["epoch"] == 1
    resumed = build_train_loader(streaming_cfg, tok, micro_batch_size=3, seed=4)
    resumed.load_state_dict(state)
    assert_batches_equal(before + take(resumed, 2), reference)
    with pytest.raises(DataStateError, match="streaming loader, this one is prepared"):
        build_train_loader(cfg, tok, micro_batch_size=3, seed=4).load_state_dict(state)

    # Sharding equivalence holds for streaming too.
    single = take(build_train_loader(streaming_cfg, tok, micro_batch_size=4, seed=4), 3)
    ranks = [take(build_train_loader(streaming_cfg, tok, micro_batch_size=2, dp_rank=r, dp_world_size=2, seed=4), 3)
             for r in range(2)]
    for k in range(3):
        assert torch.equal(torch.cat([ranks[0][k]["input_ids"], ranks[1][k]["input_ids"]]), single[k]["input_ids"])


def test_hf_streaming_epoch_is_a_document_permutation(tmp_path, jsonl_file):
    path, docs = jsonl_file
    tok = ByteTokenizer()
    cfg = _hf_cfg(tmp_path, hf_data_files=str(path), text_field="body", streaming=True, seq_len=1,
                  shuffle_buffer_size=8)
    loader = build_train_loader(cfg, tok, micro_batch_size=1, seed=0)
    train_docs = [d for d in docs if not _held_out(d, 0.25)]
    total_tokens = len(reference_stream(train_docs))
    # seq_len 1: window i is tokens (i, i+1); the first tokens of one epoch are the whole stream but the last.
    tokens = [next(loader)["input_ids"][0, 0].item() for _ in range(total_tokens - 1)]
    assert loader.state_dict()["epoch"] == 0
    next(loader)
    assert loader.state_dict()["epoch"] == 1
    recovered = []
    current: list[int] = []
    for t in tokens + [EOS]:
        if t == EOS:
            recovered.append(bytes(current).decode("utf-8"))
            current = []
        else:
            current.append(t)
    assert sorted(recovered) == sorted(train_docs) and recovered != train_docs


def test_hf_errors_name_the_field(tmp_path, jsonl_file):
    path, _ = jsonl_file
    tok = ByteTokenizer()
    with pytest.raises(DataConfigError, match=r"data\.hf_dataset=.*no such local file or directory"):
        build_train_loader(_hf_cfg(tmp_path, hf_dataset=str(tmp_path / "nowhere")), tok)
    with pytest.raises(DataConfigError, match=r"data\.hf_data_files: no such file"):
        build_train_loader(_hf_cfg(tmp_path, hf_data_files=[str(path), str(tmp_path / "gone.jsonl")]), tok)
    for streaming in (False, True):
        with pytest.raises(DataConfigError, match=r"data\.text_field='text'.*columns: \['body', 'n'\]"):
            build_train_loader(_hf_cfg(tmp_path, hf_data_files=str(path), streaming=streaming), tok)
