"""Prepared datasets: attnres-prepare (parallel, restartable, checksummed), the memory-mapped reader, mixtures
and their exact resume, and the bad inputs each named in one error.

References are computed independently here (hashlib, plain Python counting) rather than by the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from attnres_train.data import (
    DataConfig,
    DataConfigError,
    DataStateError,
    IndexPermutation,
    PreparedDataset,
    apportion,
    build_loaders,
    build_train_loader,
    build_val_loader,
    open_sources,
    prepare_dataset,
)

STDLIB_SUBSET = {"source": "stdlib", "max_documents": 120, "validation_fraction": 0.1}


def file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.npy"))}


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def prose(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "ünïcode", "漢字"]
    return [" ".join(rng.choice(words, size=int(rng.integers(20, 200)))) for _ in range(count)]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    """Two small prepared datasets: stdlib code and synthetic prose (both with validation documents)."""
    root = tmp_path_factory.mktemp("sources")
    code = root / "code"
    prepare_dataset({**STDLIB_SUBSET, "max_documents": 60}, code, num_workers=0, progress=False)
    prose_dir = root / "prose"
    source = write_jsonl(root / "prose.jsonl", prose(400, seed=0))
    prepare_dataset({"source": "hf", "hf_data_files": str(source), "validation_fraction": 0.1,
                     "cache_dir": str(root / "hf")}, prose_dir, num_workers=0, progress=False)
    return code, prose_dir


def mixture_cfg(code: Path, prose_dir: Path, code_weight: float = 3.0, prose_weight: float = 1.0, **extra) -> dict:
    return {"source": "prepared", "seq_len": 32, **extra,
            "mixture": [{"path": str(code), "weight": code_weight, "name": "code"},
                        {"path": str(prose_dir), "weight": prose_weight, "name": "prose"}]}


def source_of_rows(batch: dict, code_tokens: set) -> list[str]:
    """Which source a row came from: prose text is pure letters/spaces/UTF-8, code has punctuation."""
    return ["code" if any(t in code_tokens for t in row.tolist()) else "prose" for row in batch["input_ids"]]


# ----------------------------------------------------------------------------------------------------
# the permutation and the apportioning
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_index_permutation_is_a_seeded_bijection(n):
    perm = IndexPermutation(n, (1, 2))
    values = perm(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    assert np.array_equal(IndexPermutation(n, (1, 2))(np.arange(n)), values)
    if n >= 64:
        assert not np.array_equal(IndexPermutation(n, (1, 3))(np.arange(n)), values)
        assert abs(np.corrcoef(np.arange(n), values)[0, 1]) < 0.2  # shuffled, not a shifted identity
    with pytest.raises(IndexError):
        perm(np.array([n]))


@pytest.mark.parametrize("weights", [[3, 1], [0.5, 0.3, 0.2], [1, 1, 1, 1, 1, 1, 1], [0.97, 0.02, 0.01], [1, 0, 2]])
@pytest.mark.parametrize("step_size", [1, 3, 8, 13])
def test_apportion_keeps_each_step_and_the_running_total_within_one_sample(weights, step_size):
    w = np.array(weights, dtype=np.float64) / sum(weights)
    drawn = np.zeros(len(w), dtype=np.int64)
    for _ in range(200):
        counts = apportion(step_size, w, drawn)
        assert counts.sum() == step_size and (counts >= 0).all()
        assert (np.abs(counts - step_size * w) < 1).all(), counts  # within one sample per step
        assert (counts[w == 0] == 0).all()
        drawn += counts
        assert (np.abs(drawn - drawn.sum() * w) <= 1.0 + 1e-9).all(), drawn  # and over the whole run


# ----------------------------------------------------------------------------------------------------
# attnres-prepare
# ----------------------------------------------------------------------------------------------------
def test_prepare_writes_a_manifest_with_counts_checksums_and_split_rule(tmp_path):
    out = tmp_path / "stdlib"
    manifest = prepare_dataset(STDLIB_SUBSET, out, num_workers=0, shard_text_bytes=200_000, progress=False)
    assert manifest["format_version"] == 1 and manifest["token_dtype"] == "uint16"
    assert manifest["tokenizer"] == {"name": "byte", "identity": "byte-utf8-v1", "vocab_size": 258, "eos_token_id": 256}
    assert manifest["split"]["validation_fraction"] == 0.1 and manifest["split"]["key"] == "relative path"
    train = manifest["parts"]["train"]
    assert train["num_documents"] == 120 and len(train["shards"]) > 3
    for shard in train["shards"] + manifest["parts"]["validation"]["shards"]:
        for entry in (shard["tokens"], shard["documents"]):
            data = (out / entry["file"]).read_bytes()
            assert len(data) == entry["size_bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        tokens = np.load(out / shard["tokens"]["file"])
        ends = np.load(out / shard["documents"]["file"])
        assert tokens.size == shard["num_tokens"] == ends[-1] and ends.size == shard["num_documents"]
        assert (tokens[ends - 1] == 256).all() and (tokens == 256).sum() == ends.size
    assert sum(s["num_tokens"] for s in train["shards"]) == train["num_tokens"]
    assert not (out / ".progress").exists()
    # Running it again is a no-op; other settings for the same directory are refused, nothing changed.
    before = file_digests(out)
    assert prepare_dataset(STDLIB_SUBSET, out, num_workers=0, shard_text_bytes=200_000, progress=False) == manifest
    with pytest.raises(DataConfigError, match=r"out_dir=.*prepared differently.*data.max_documents"):
        prepare_dataset({**STDLIB_SUBSET, "max_documents": 10}, out, num_workers=0, shard_text_bytes=200_000)
    assert file_digests(out) == before


def test_parallel_prepare_writes_the_same_files_as_one_process(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", prose(300, seed=1))
    cfg = {"source": "hf", "hf_data_files": str(source), "validation_fraction": 0.2, "cache_dir": str(tmp_path / "hf")}
    prepare_dataset(cfg, tmp_path / "serial", num_workers=0, shard_text_bytes=4_000, progress=False)
    prepare_dataset(cfg, tmp_path / "parallel", num_workers=2, shard_text_bytes=4_000, progress=False)
    serial = file_digests(tmp_path / "serial")
    assert len(serial) > 20 and file_digests(tmp_path / "parallel") == serial


def test_prepare_killed_with_sigkill_continues_and_gives_byte_identical_shards(tmp_path):
    args = ["data.max_documents=400", "data.validation_fraction=0.1", "shard_mb=0.25", "workers=0", "progress=false"]
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "attnres_train.data.prepare_cli", *args, f"out_dir={clean}"], check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "attnres_train.data.prepare_cli", *args, f"out_dir={killed}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / ".progress").glob("chunk-*.json"))) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted((killed / ".progress").glob("chunk-*.json"))
    assert len(finished) >= 3 and not (killed / "manifest.json").exists(), "the kill should land mid-preparation"
    with pytest.raises(DataConfigError, match=r"has no manifest.json \(its preparation did not finish"):
        PreparedDataset(killed)
    recorded = [entry["file"] for record in finished for part in json.loads(record.read_text())["parts"].values()
                for entry in (part["tokens"], part["documents"])]
    kept = {name: (killed / name).stat().st_mtime_ns for name in recorded}

    done = subprocess.run([sys.executable, "-m", "attnres_train.data.prepare_cli", *args, f"out_dir={killed}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert file_digests(killed) == file_digests(clean)
    assert _without_times(json.loads((killed / "manifest.json").read_text())) == \
        _without_times(json.loads((clean / "manifest.json").read_text()))
    assert not (killed / ".progress").exists()  # progress records go once the manifest is written
    # Chunks recorded as finished before the kill were not tokenized again (their files untouched).
    redone = [name for name, mtime in kept.items() if (killed / name).stat().st_mtime_ns != mtime]
    assert not redone, redone
    assert not list(killed.glob(".*.tmp")) and not list(killed.glob("*.tmp"))


def _without_times(manifest: dict) -> dict:
    """The part listing without file times (the only thing two preparations of the same data differ in)."""
    for part in manifest["parts"].values():
        for shard in part["shards"]:
            for entry in (shard["tokens"], shard["documents"]):
                entry.pop("mtime_ns")
    return manifest["parts"]


def test_prepare_cli_reports_bad_input_in_one_line_and_writes_nothing(tmp_path):
    def prepare(*args):
        return subprocess.run([sys.executable, "-m", "attnres_train.data.prepare_cli", *args],
                              capture_output=True, text=True)

    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    other_field = write_jsonl(tmp_path / "body.jsonl", ["some text"], field="body")
    cases = {
        "empty source": (["data=hf", f"data.hf_data_files={empty}"], "no training documents"),
        "missing text field": (["data=hf", f"data.hf_data_files={other_field}"], r"data.text_field='text'"),
        "missing file": (["data=hf", f"data.hf_data_files={tmp_path / 'gone.jsonl'}"], "data.hf_data_files"),
        "no out_dir": ([], "out_dir: required"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        result = prepare(*args, *([f"out_dir={out}"] if name != "no out_dir" else []))
        assert result.returncode == 2, (name, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and __import__("re").search(message, lines[0]), (name, result.stderr)
        assert not out.exists(), name
    help_text = prepare("--help")
    assert help_text.returncode == 0 and "out_dir=DIR" in help_text.stdout


# ----------------------------------------------------------------------------------------------------
# the reader
# ----------------------------------------------------------------------------------------------------
def test_reader_refuses_corrupt_truncated_or_foreign_data(tmp_path, two_sources):
    import shutil

    code, _ = two_sources
    copy = tmp_path / "copy"
    shutil.copytree(code, copy, copy_function=shutil.copy)  # new file times, as a plain cp gives
    shard = sorted(copy.glob("train-*.tokens.npy"))[0]
    # A copy (new file times) is verified once, then trusted while unchanged.
    PreparedDataset(copy)
    assert set(json.loads((copy / "verified.json").read_text())) >= {shard.name}

    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one flipped bit, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(DataConfigError, match=rf"prepared shard {shard}: checksum does not match"):
        PreparedDataset(copy)
    PreparedDataset(copy, verify="never")  # the user's explicit choice
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(DataConfigError, match=rf"prepared shard {shard}: .* bytes, the manifest says"):
        PreparedDataset(copy, verify="never")
    shard.unlink()
    with pytest.raises(DataConfigError, match="is missing"):
        PreparedDataset(copy)
    with pytest.raises(DataConfigError, match=r"data\.path=.*no such directory"):
        build_train_loader({"source": "prepared", "path": str(tmp_path / "nowhere")})
    (tmp_path / "not_prepared").mkdir()
    with pytest.raises(DataConfigError, match=r"data\.path=.*has no manifest.json \(expected a dataset written by"):
        build_train_loader({"source": "prepared", "path": str(tmp_path / "not_prepared")})
    with pytest.raises(DataConfigError, match=r"data\.mixture\[1\]\.path=.*no such directory"):
        build_train_loader({"source": "prepared", "mixture": [{"path": str(code)}, {"path": str(tmp_path / "x")}]})


def test_a_tokenizer_other_than_the_manifests_is_refused(tmp_path, two_sources):
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(prose(50, seed=3), trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path / "bpe")
    code, _ = two_sources
    with pytest.raises(DataConfigError, match=r"data\.path=.* was tokenized with 'byte'.*set data\.tokenizer to"):
        build_train_loader({"source": "prepared", "path": str(code), "tokenizer": str(tmp_path / "bpe")})


def test_config_errors_of_prepared_sources_name_the_field():
    cases = {
        r"data\.path=None: expected a prepared dataset directory, or null with data\.mixture": {},
        r"data\.mixture\[0\]\.weight=-1": {"mixture": [{"path": "/a", "weight": -1}]},
        r"data\.mixture: every weight is 0": {"mixture": [{"path": "/a", "weight": 0}, {"path": "/b", "weight": 0}]},
        r"data\.mixture\[0\]=.*expected \{path": {"mixture": [{"paths": "/a"}]},
        r"data\.mixture=.*distinct source names": {"mixture": [{"path": "/a/x"}, {"path": "/b/x"}]},
        r"data\.verify_shards='sometimes'": {"path": "/a", "verify_shards": "sometimes"},
    }
    for message, fields in cases.items():
        with pytest.raises(DataConfigError, match=message):
            DataConfig.from_mapping({"source": "prepared", **fields})


# ----------------------------------------------------------------------------------------------------
# mixtures: proportions, epochs, resume
# ----------------------------------------------------------------------------------------------------
def test_each_step_draws_the_configured_proportions_and_each_source_epochs_on_its_own(two_sources):
    code, prose_dir = two_sources
    cfg = mixture_cfg(code, prose_dir, code_weight=0.7, prose_weight=0.3)
    prose_chars = set("".join(prose(400, seed=0)).encode("utf-8")) | {256}
    code_tokens = set(range(257)) - prose_chars
    loader = build_train_loader(cfg, micro_batch_size=5, dp_world_size=2, dp_rank=0, seed=0, grad_accum_steps=2)
    other_rank = build_train_loader(cfg, micro_batch_size=5, dp_world_size=2, dp_rank=1, seed=0, grad_accum_steps=2)
    for _ in range(6):  # a step: 2 micro-batches x 2 ranks x 5 rows = 20 samples, 14 code + 6 prose
        rows = []
        for _ in range(2):
            rows += source_of_rows(next(loader), code_tokens) + source_of_rows(next(other_rank), code_tokens)
        assert Counter(rows) == {"code": 14, "prose": 6}
    state = loader.state_dict()
    assert state["source_samples"] == {"code": 84, "prose": 36}
    prose_windows = open_sources(cfg)[1].part("train").num_windows(32)
    assert state["epochs"]["prose"] == 36 // prose_windows  # the small source has wrapped around on its own
    assert state["epochs"]["code"] == 0


def test_mixture_resume_twice_and_on_another_number_of_ranks_continues_exactly(two_sources):
    code, prose_dir = two_sources
    cfg = mixture_cfg(code, prose_dir)
    straight = build_train_loader(cfg, micro_batch_size=6, seed=9)
    reference = [next(straight) for _ in range(12)]

    first = build_train_loader(cfg, micro_batch_size=6, seed=9)
    got = [next(first) for _ in range(4)]
    second = build_train_loader(cfg, micro_batch_size=6, seed=9)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [next(second) for _ in range(3)]
    # Two ranks with half the micro batch: the same global batches, split.
    ranks = [build_train_loader(cfg, micro_batch_size=3, dp_rank=r, dp_world_size=2, seed=9) for r in range(2)]
    for rank in ranks:
        rank.load_state_dict(json.loads(json.dumps(second.state_dict())))
    for _ in range(5):
        halves = [next(rank) for rank in ranks]
        got.append({k: torch.cat([h[k] for h in halves]) for k in halves[0]})
    for a, b in zip(got, reference, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key

    # Another global batch continues every source where it was (here: at a step boundary).
    bigger = build_train_loader(cfg, micro_batch_size=8, seed=9)
    bigger.load_state_dict(first.state_dict())
    next(bigger)
    assert sum(bigger.state_dict()["source_samples"].values()) == 24 + 8
    # Inside a step (gradient accumulation), only the same step size may continue.
    accumulating = build_train_loader(cfg, micro_batch_size=6, seed=9, grad_accum_steps=2)
    next(accumulating)
    with pytest.raises(DataStateError, match="inside a step of 12 samples"):
        build_train_loader(cfg, micro_batch_size=6, seed=9).load_state_dict(accumulating.state_dict())
    with pytest.raises(DataStateError, match="sources"):
        build_train_loader({"source": "prepared", "path": str(code), "seq_len": 32}, micro_batch_size=6,
                           seed=9).load_state_dict(first.state_dict())


def test_mixture_validation_scores_every_source_with_its_own_fixed_windows(two_sources):
    code, prose_dir = two_sources
    cfg = mixture_cfg(code, prose_dir)
    train, val = build_loaders(cfg, micro_batch_size=2, val_num_batches=3)
    assert val.source_names == ["code", "prose"] and val.source_weights == [3.0, 1.0]
    pairs = list(val.iter_by_source())
    assert [name for name, _ in pairs] == ["code"] * 3 + ["prose"] * 3
    again = list(build_val_loader(cfg, micro_batch_size=2, num_batches=3).iter_by_source())
    assert all(torch.equal(a[1]["input_ids"], b[1]["input_ids"]) for a, b in zip(pairs, again))


# ----------------------------------------------------------------------------------------------------
# the trainer on a mixture
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_on_a_mixture_logs_per_source_validation_and_resumes_exactly_after_sigkill(tmp_path, two_sources):
    from cli_helpers import Launched, check_ok, complete_checkpoints, last_logged_step, run_train, train_command, \
        train_records, val_records

    code, prose_dir = two_sources
    total_steps = 7
    common = ["model=tiny", "train.device=cpu", "data=prepared", "data.seq_len=64", "train.micro_batch_size=3",
              "train.grad_accum_steps=2", "train.val_batches=1", "train.val_every=3", "train.log_every=1",
              "optim.warmup_steps=1", "train.progress_bar=false", f"train.max_steps={total_steps}",
              f"data.mixture=[{{path:{code},weight:3,name:code}},{{path:{prose_dir},weight:1,name:prose}}]"]
    straight_dir = tmp_path / "straight"
    check_ok(run_train([*common, f"run_dir={straight_dir}", "train.checkpoint_every=1000"], cwd=tmp_path))
    validations = val_records(straight_dir)
    assert [v["step"] for v in validations] == [3, 6, 7]
    for record in validations:
        by_source = record["val_loss_by_source"]
        assert set(by_source) == {"code", "prose"}
        assert record["val_loss"] == pytest.approx((3 * by_source["code"] + by_source["prose"]) / 4, rel=1e-12)

    killed_dir = tmp_path / "killed"
    killed_args = [*common, f"run_dir={killed_dir}", "train.checkpoint_every=3"]
    launched = Launched(train_command(killed_args), cwd=tmp_path, log_dir=tmp_path / "killed_logs")
    try:
        launched.wait_until(
            lambda: "step_00000003" in complete_checkpoints(killed_dir) and (last_logged_step(killed_dir) or 0) >= 4,
            timeout=180,
        )
        launched.send(signal.SIGKILL)
        launched.wait(timeout=30)
    finally:
        launched.kill()
    assert (last_logged_step(killed_dir) or 0) < total_steps, "the kill should land mid-run"
    resumed = check_ok(run_train(killed_args, cwd=tmp_path))
    assert "resumed_from=step_00000003" in resumed.stdout
    fields = ("step", "loss", "grad_norm", "lr", "tokens")
    assert [{f: r[f] for f in fields} for r in train_records(killed_dir)] == \
        [{f: r[f] for f in fields} for r in train_records(straight_dir)]
    assert [v["val_loss_by_source"] for v in val_records(killed_dir)] == [v["val_loss_by_source"] for v in validations]
