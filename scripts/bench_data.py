"""Data pipeline at corpus scale: prepare throughput, loader throughput, and what a run pays for a large corpus.

Measures, on the machine it runs on (CPU figures are the point):
* prepare throughput in MB of text per second per worker, byte tokenizer and a BPE tokenizer trained here
  with the ``tokenizers`` library (no download), at 1 and 2 workers (worker start-up included);
* loader throughput in tokens per second per rank: batches assembled from memory-mapped shards;
* peak resident memory and wall time of a one-step training run (``attnres-train data=prepared``, tiny model)
  on a ~20 MB corpus and on a ~2B-token one, and the data start-up alone (open + first batch) in-process;
* resume latency (load the loader state + first batch) at position 0 and near the end of the large corpus.

The large corpus is random byte-level tokens written through the same shard writer as ``attnres-prepare``
(tokenizing 2 GB of text on 2 cores would take most of an hour and measure nothing the small run does not).

    python scripts/bench_data.py                      # full run: ~4 GB of shards under --work-dir
    python scripts/bench_data.py --dry-run            # tiny sizes, for tests
Writes benchmarks/results/data_<machine>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, one_process_environment, write_report  # noqa: E402

RSS_WRAPPER = (
    "import resource, subprocess, sys, time; start = time.perf_counter(); "
    "code = subprocess.run(sys.argv[1:]).returncode; "
    "print('BENCH', code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - start)"
)


def corpus_texts(target_bytes: int) -> list[str]:
    """Real text: the standard library's source files, repeated until ``target_bytes``."""
    from attnres_train.data import list_stdlib_files, stdlib_root

    root = stdlib_root()
    texts, total = [], 0
    files = list_stdlib_files(root)
    while total < target_bytes:
        for name in files:
            text = (root / name).read_text(encoding="utf-8", errors="replace")
            texts.append(text)
            total += len(text.encode("utf-8"))
            if total >= target_bytes:
                break
    return texts


def train_bpe(texts: list[str], directory: Path, vocab_size: int) -> Path:
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(directory)
    return directory


def measure_prepare(work: Path, texts: list[str], tokenizer: str, workers: int) -> dict:
    from attnres_train.data import prepare_dataset

    source = work / "prepare_source.jsonl"
    if not source.exists():
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = work / f"prepared-{Path(tokenizer).name}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {"source": "hf", "hf_data_files": str(source), "tokenizer": tokenizer, "validation_fraction": 0.01,
           "cache_dir": str(work / "hf_cache")}
    from attnres_train.data.sources import document_streams
    from attnres_train.data.config import DataConfig

    document_streams(DataConfig.from_mapping(cfg))  # datasets' one-time jsonl -> arrow conversion, not timed
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    start = time.perf_counter()
    manifest = prepare_dataset(cfg, out, num_workers=workers, shard_text_bytes=max(1, int(text_mb * 1e6 / (4 * workers))),
                               progress=False)
    seconds = time.perf_counter() - start
    tokens = manifest["parts"]["train"]["num_tokens"] + manifest["parts"]["validation"]["num_tokens"]
    shutil.rmtree(out, ignore_errors=True)
    row = {"tokenizer": "byte" if tokenizer == "byte" else "bpe", "workers": workers, "text_mb": round(text_mb, 2),
           "seconds": round(seconds, 3), "mb_per_s": round(text_mb / seconds, 3),
           "mb_per_s_per_worker": round(text_mb / seconds / workers, 3), "tokens_per_s": round(tokens / seconds)}
    print(f"prepare {row['tokenizer']:>4} x{workers}: {row['mb_per_s']:.2f} MB/s ({row['mb_per_s_per_worker']:.2f} "
          f"per worker), {row['tokens_per_s'] / 1e6:.2f}M tokens/s")
    return row


def write_random_corpus(out: Path, num_tokens: int, shard_tokens: int, seed: int = 0) -> dict:
    """A prepared byte-level dataset of ``num_tokens`` random tokens (documents of random length), plus a
    small validation part, written with the preparation's own shard and manifest writers."""
    from attnres_train.data import DataConfig, build_tokenizer
    from attnres_train.data.prepare import preparation_plan, write_chunk, write_manifest

    tokenizer = build_tokenizer({"tokenizer": "byte"})
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []

    def random_documents(count: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = rng.integers(0, 256, size=count, dtype=np.uint16)
        ends = np.unique(np.concatenate([rng.integers(1, count, size=max(1, count // 2000)), [count]]))
        tokens[ends - 1] = tokenizer.eos_token_id
        return tokens, ends.astype(np.int64)

    written, index = 0, 0
    while written < num_tokens:
        count = min(shard_tokens, num_tokens - written)
        parts = {"train": random_documents(count)}
        if index == 0:
            parts["validation"] = random_documents(max(count // 100, 70_000))
        records.append(write_chunk(out, index, parts, text_bytes=count))
        written += count
        index += 1
    plan = preparation_plan(DataConfig(), tokenizer, {"synthetic": "random byte tokens", "seed": seed}, shard_tokens)
    return write_manifest(out, plan, records)


def one_step_run(work: Path, corpus: Path, name: str, seq_len: int) -> dict:
    """Peak RSS (the training process) and wall time of a one-step run on ``corpus``."""
    run_dir = work / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    script = Path(sys.executable).parent / "attnres-train"
    command = [str(script) if script.exists() else sys.executable, *([] if script.exists() else ["-m", "attnres_train.train"]),
               "model=tiny", "data=prepared", f"data.path={corpus}", f"data.seq_len={seq_len}", "train.device=cpu",
               "train.max_steps=1", "optim.warmup_steps=0", "train.micro_batch_size=4", "train.val_batches=1", "train.checkpoint_every=0",
               "train.progress_bar=false", f"run_dir={run_dir}"]
    result = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *command], capture_output=True, text=True,
                            env=one_process_environment())
    line = [l for l in result.stdout.splitlines() if l.startswith("BENCH ")]
    if result.returncode != 0 or not line or line[-1].split()[1] != "0":
        raise SystemExit(f"one-step run on {corpus} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    _, _, max_rss_kb, seconds = line[-1].split()
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"peak_rss_mb": round(int(max_rss_kb) / 1024, 1), "wall_s": round(float(seconds), 3)}


def data_startup(corpus: Path, seq_len: int) -> float:
    """Seconds to open a prepared corpus and assemble the first training batch and validation batch."""
    from attnres_train.data import build_loaders

    start = time.perf_counter()
    train, val = build_loaders({"source": "prepared", "path": str(corpus), "seq_len": seq_len}, micro_batch_size=4,
                               val_num_batches=1)
    next(train)
    next(iter(val))
    return time.perf_counter() - start


def loader_throughput(corpus: Path, seq_len: int, micro_batch: int, seconds: float) -> float:
    from attnres_train.data import build_train_loader

    loader = build_train_loader({"source": "prepared", "path": str(corpus), "seq_len": seq_len},
                                micro_batch_size=micro_batch, seed=1)
    next(loader)
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(loader)
        batches += 1
    return batches * micro_batch * seq_len / (time.perf_counter() - start)


def resume_latency(corpus: Path, seq_len: int, samples_consumed: int) -> float:
    from attnres_train.data import build_train_loader

    cfg = {"source": "prepared", "path": str(corpus), "seq_len": seq_len}
    loader = build_train_loader(cfg, micro_batch_size=8, seed=1)
    state = loader.state_dict()
    state.update(samples_consumed=samples_consumed, step_start=samples_consumed,
                 source_samples={name: samples_consumed for name in state["source_samples"]})
    start = time.perf_counter()
    resumed = build_train_loader(cfg, micro_batch_size=8, seed=1)
    resumed.load_state_dict(state)
    next(resumed)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (seconds): checks the script, not the machine")
    parser.add_argument("--large-tokens", type=float, default=2e9)
    parser.add_argument("--small-tokens", type=float, default=1e7, help="~20 MB of uint16 shards")
    parser.add_argument("--prepare-mb", type=float, default=32.0, help="MB of text per byte-tokenizer measurement")
    parser.add_argument("--bpe-mb", type=float, default=8.0, help="MB of text per BPE measurement")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--work-dir", default=None, help="where corpora are written (default: a temporary dir)")
    parser.add_argument("--machine", default=f"{platform.machine()}-{os.cpu_count()}cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.large_tokens, args.small_tokens, args.prepare_mb, args.bpe_mb = 2e6, 2e5, 0.3, 0.1
        args.seq_len = min(args.seq_len, 128)
    import torch

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        texts = corpus_texts(int(args.prepare_mb * 1e6))
        bpe_texts = texts[: max(1, len(texts) * int(args.bpe_mb * 10) // max(1, int(args.prepare_mb * 10)))]
        tokenizer_dir = train_bpe(texts[:200], work / "bpe", vocab_size=8192 if not args.dry_run else 400)
        (work / "byte").mkdir(exist_ok=True)
        (work / "bpe_run").mkdir(exist_ok=True)
        prepare_rows = [measure_prepare(work / "byte", texts, "byte", w) for w in (1, 2)]
        prepare_rows += [measure_prepare(work / "bpe_run", bpe_texts, str(tokenizer_dir), w) for w in (1, 2)]

        shard_tokens = 2**27 if not args.dry_run else 2**19
        small = work / "small"
        large = work / "large"
        start = time.perf_counter()
        small_manifest = write_random_corpus(small, int(args.small_tokens), shard_tokens, seed=1)
        large_manifest = write_random_corpus(large, int(args.large_tokens), shard_tokens, seed=2)
        print(f"wrote corpora of {args.small_tokens:.3g} and {args.large_tokens:.3g} tokens in "
              f"{time.perf_counter() - start:.1f} s")

        runs = {name: one_step_run(work, path, name, args.seq_len) for name, path in (("small", small), ("large", large))}
        startup = {name: round(data_startup(path, args.seq_len), 4) for name, path in (("small", small), ("large", large))}
        loader_rows = []
        for seq_len, micro_batch in ((4096, 8), (1024, 8), (args.seq_len, 8)):
            tokens_per_s = loader_throughput(large, seq_len, micro_batch, seconds=0.25 if args.dry_run else 5.0)
            loader_rows.append({"seq_len": seq_len, "micro_batch": micro_batch, "tokens_per_s": round(tokens_per_s)})
            print(f"loader seq_len {seq_len} x {micro_batch}: {tokens_per_s / 1e6:.1f}M tokens/s per rank")
        windows = (large_manifest["parts"]["train"]["num_tokens"] - 1) // args.seq_len
        resume = {"start": resume_latency(large, args.seq_len, 0),
                  "end": resume_latency(large, args.seq_len, windows - 8)}
        print(f"one-step run: small {runs['small']}, large {runs['large']}; data start-up {startup}; "
              f"resume {resume}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    byte_rows = [r for r in prepare_rows if r["tokenizer"] == "byte"]
    report = {
        **environment(torch.device("cpu")),
        "dry_run": args.dry_run,
        "machine": args.machine,
        "cpu_count": os.cpu_count(),
        "config": {"seq_len": args.seq_len, "prepare_mb": args.prepare_mb, "bpe_mb": args.bpe_mb,
                   "shard_tokens": shard_tokens, "one_step_run": "model=tiny micro_batch 4 on CPU, 1 step + 1 validation batch"},
        "corpus_tokens_small": small_manifest["parts"]["train"]["num_tokens"],
        "corpus_tokens_large": large_manifest["parts"]["train"]["num_tokens"],
        "prepare_mb_per_s_per_worker": min(r["mb_per_s_per_worker"] for r in byte_rows),
        "prepare": prepare_rows,
        "loader_tokens_per_s": min(r["tokens_per_s"] for r in loader_rows),
        "loader": loader_rows,
        "peak_rss_mb_small": runs["small"]["peak_rss_mb"],
        "peak_rss_mb_large": runs["large"]["peak_rss_mb"],
        "startup_s_small": runs["small"]["wall_s"],
        "startup_s_large": runs["large"]["wall_s"],
        "data_startup_s_small": startup["small"],
        "data_startup_s_large": startup["large"],
        "resume_s_start": round(resume["start"], 4),
        "resume_s_end": round(resume["end"], 4),
        "targets": {"loader_tokens_per_s": ">= 1e7", "peak_rss_mb": "large within 100 of small",
                    "startup_s": "large within 2 of small", "resume_s": "end within 1 of start"},
    }
    report["targets_met"] = {
        "loader_tokens_per_s": report["loader_tokens_per_s"] >= 1e7,
        "peak_rss_mb": abs(report["peak_rss_mb_large"] - report["peak_rss_mb_small"]) <= 100,
        "startup_s": abs(report["startup_s_large"] - report["startup_s_small"]) <= 2,
        "resume_s": abs(report["resume_s_end"] - report["resume_s_start"]) <= 1,
    }
    write_report(report, args.out, f"data_{args.machine}.json")
    return report


if __name__ == "__main__":
    main()
