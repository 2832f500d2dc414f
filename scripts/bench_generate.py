#!/usr/bin/env python
"""Decode throughput against the context length: a hybrid model (linear attention with a full-attention layer every
few layers), the same model with full attention in every layer, and (to isolate the linear layers) with linear
attention in every layer; batch 1, at 1K, 8K and 32K tokens of context.

Linear layers carry a constant-size state, so their per-token cost is flat; full attention reads every cached
column at every step, so the hybrid grows only by its few full-attention layers. Writes JSON under
benchmarks/results/.

How the long context is built: a real prefill of 32K tokens through every layer would dominate the run time on a
CPU and does not change the cost of a decode step, which depends on the cache's SIZE, not on its values. So for
contexts above ``--real-prefill-max`` the cache is filled synthetically: attention caches get random columns and
every row is marked as having consumed that many real tokens; recurrent states and conv windows get random values
of their (constant) shape. Up to ``--real-prefill-max`` the context is a real prefill (random token ids), timed too,
so the JSON shows that decode speed after a real and after a synthetic fill agree where both are measured.

    python scripts/bench_generate.py                          # small preset, 1K / 8K / 32K, a few minutes on 2 cores
    python scripts/bench_generate.py --dry-run --out /tmp/generate_dry.json      # tiny preset, short contexts
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import environment, write_report  # noqa: E402

from attnres_train.model import ModelConfig, build_model  # noqa: E402
from attnres_train.model.cache import DecodeCache, RecurrentCache  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset under configs/model (the hybrid)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per context (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--real-prefill-max", type=int, default=1024,
                   help="contexts up to this length are a real prefill; longer ones are filled synthetically")
    p.add_argument("--prefill-chunk", type=int, default=1024, help="tokens per prefill call")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default: batch-1 decode of a small model gains nothing from more, and on a "
                        "shared machine extra threads mostly measure the neighbours")
    p.add_argument("--dry-run", action="store_true", help="tiny preset and short contexts")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def model_configs(preset: str) -> dict[str, ModelConfig]:
    base = yaml.safe_load((REPO / "configs" / "model" / f"{preset}.yaml").read_text())
    hybrid = ModelConfig.from_mapping(base)
    full = ModelConfig.from_mapping({**base, "hybrid_ratio": 0, "layer_pattern": None})
    # Not a model anyone would train (no full-attention layer at all): it isolates the linear layers' share.
    linear = ModelConfig.from_mapping({**base, "layer_pattern": "L" * hybrid.num_layers})
    return {"hybrid": hybrid, "full_attention": full, "linear_only": linear}


@torch.no_grad()
def fill_synthetically(cache: DecodeCache, context: int, generator: torch.Generator) -> None:
    """Make ``cache`` look as if every row had consumed ``context`` real tokens (see the module docstring)."""
    for layer in cache.layers:
        for name, tensor in vars(layer).items():
            if isinstance(layer, RecurrentCache):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
            else:  # attention columns: only the consumed ones are ever read
                tensor[:, :context] = torch.randn(tensor[:, :context].shape, generator=generator, dtype=tensor.dtype)
    cache.columns = context
    cache.lengths_B.fill_(context)
    cache.key_mask_BS[:, :context] = True


@torch.no_grad()
def prepared_cache(model, context: int, args, generator: torch.Generator) -> tuple[DecodeCache, dict]:
    """A batch-1 cache holding ``context`` tokens (real or synthetic prefill) and the start of its result row."""
    cache = model.new_cache(1, context + args.warmup + args.steps)
    row = {"context": context}
    if context <= args.real_prefill_max:
        start = time.perf_counter()
        for begin in range(0, context, args.prefill_chunk):
            size = min(args.prefill_chunk, context - begin)
            model(torch.randint(0, model.config.vocab_size, (1, size), generator=generator), cache=cache,
                  logits_to_keep=1)
        row["prefill"] = "real"
        row["prefill_tokens_per_s"] = context / (time.perf_counter() - start)
    else:
        fill_synthetically(cache, context, generator)
        row["prefill"] = "synthetic"
    return cache, row


@torch.no_grad()
def measure(model, contexts: list[int], args, generator: torch.Generator) -> list[dict]:
    """Decode steps at every context, interleaved (one step per context in turn), so that a burst of load from
    other processes hits all contexts alike instead of one of them."""
    prepared = [prepared_cache(model, context, args, generator) for context in contexts]
    tokens = [torch.randint(0, model.config.vocab_size, (1, 1), generator=generator) for _ in contexts]
    times: list[list[float]] = [[] for _ in contexts]
    for step in range(args.warmup + args.steps):
        for index, (cache, _) in enumerate(prepared):
            start = time.perf_counter()
            tokens[index] = model(tokens[index], cache=cache).logits[:, -1].argmax(-1, keepdim=True)
            if step >= args.warmup:
                times[index].append(time.perf_counter() - start)
    rows = []
    for (cache, row), step_times in zip(prepared, times):
        step_times.sort()
        # The fastest step is the one least disturbed by other processes (a decode step is deterministic work);
        # tokens/s is quoted from it, the median is kept beside it.
        row.update(decode_tokens_per_s=1.0 / step_times[0], decode_ms_min=1e3 * step_times[0],
                   decode_ms_median=1e3 * step_times[len(step_times) // 2],
                   decode_ms_all=[round(1e3 * t, 3) for t in step_times], cache_numel_per_layer=cache.state_numel())
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        args.preset, args.contexts, args.steps, args.warmup = "tiny", [32, 96], 2, 1
        args.real_prefill_max, args.prefill_chunk = 32, 16
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    report = {
        "benchmark": "decode tokens/s vs context, batch 1, fp32, CPU",
        "dry_run": args.dry_run,
        **environment(device),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads":
                    torch.get_num_threads()},
        "config": {"preset": args.preset, "contexts": args.contexts, "steps": args.steps, "warmup": args.warmup,
                   "real_prefill_max": args.real_prefill_max, "prefill_chunk": args.prefill_chunk},
        "models": {},
        "results": [],
    }
    for name, cfg in model_configs(args.preset).items():
        model = build_model(cfg).eval()
        report["models"][name] = {"layer_pattern": "".join(cfg.layer_kinds()), "parameters": model.num_parameters(),
                                  "model_config": cfg.to_dict()}
        rows = [{"model": name, **row} for row in measure(model, args.contexts, args, generator)]
        for row in rows:
            context = row["context"]
            print(f"{name:>15} context={context:>6} ({row['prefill']} prefill): "
                  f"{row['decode_tokens_per_s']:8.1f} tokens/s ({row['decode_ms_min']:.2f} ms/token min, "
                  f"{row['decode_ms_median']:.2f} median)")
        first, last = rows[0], rows[-1]
        report["models"][name]["slowdown_longest_vs_shortest"] = (
            first["decode_tokens_per_s"] / last["decode_tokens_per_s"])
        report["results"] += rows
    for name, info in report["models"].items():
        print(f"{name}: decode at {args.contexts[-1]} is {info['slowdown_longest_vs_shortest']:.2f}x slower than "
              f"at {args.contexts[0]}")
    write_report(report, args.out, f"generate_{platform.machine()}-{os.cpu_count()}cpu.json")
    return report


if __name__ == "__main__":
    main()
