#!/usr/bin/env python
"""Training-step benchmark: ``model.residual=standard`` vs ``block_attnres`` measured alternately in one run.

All variants are built from the same preset, trained on the same random token batches with AdamW, and timed in
alternating rounds so clock and thermal drift hit them equally. A variant is ``residual`` or
``residual:attnres_impl`` (``block_attnres:fused``, ``block_attnres:torch``). Prints a table and writes JSON
(device, versions, config, step time, tokens/s, MFU from the model's exact FLOP count, each AttnRes variant's
overhead over ``standard``, and with ``--profile`` the top operators of one profiled step) to ``--out``.

    python scripts/bench_train.py --preset kimi_linear_1b --seq-len 4096 --micro-batch 4 \
        --variants standard,block_attnres:fused,block_attnres:torch --profile
    python scripts/bench_train.py --preset tiny --seq-len 256 --micro-batch 2 --rounds 2 --steps 2   # CPU dry run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnres_train.model import build_model  # noqa: E402
from attnres_train.model.packing import doc_ids_from_eos  # noqa: E402
from attnres_train.train.metrics import model_flops_utilization, peak_flops_per_device  # noqa: E402
from bench_common import environment, synchronize, write_report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="kimi_linear_1b", help="name of a configs/model/*.yaml preset")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per variant")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first round")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--docs-per-row", type=int, default=1, help="packed documents per row (1: no boundaries)")
    p.add_argument("--variants", default="standard,block_attnres", help="residual[:attnres_impl], comma separated")
    p.add_argument("--profile", action="store_true", help="profile one step per variant; top operators in the JSON")
    p.add_argument("--override", action="append", default=[], help="model field override, e.g. attnres_block_size=4")
    p.add_argument("--out", default=None,
                   help="JSON path (default: benchmarks/results/bench_train_<preset>_<device>.json)")
    return p.parse_args(argv)


def load_preset(name: str, overrides: list[str]) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        cfg[key] = yaml.safe_load(value)
    return cfg


def make_batches(n, batch, seq_len, vocab, docs_per_row, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab - 1, (batch, seq_len + 1), generator=gen)
        if docs_per_row > 1:  # vocab - 1 plays EOS at evenly spaced document ends
            ends = torch.linspace(0, seq_len, docs_per_row + 1).long()[1:-1]
            ids[:, ends] = vocab - 1
        inputs, labels = ids[:, :-1], ids[:, 1:]
        doc_ids = doc_ids_from_eos(inputs, vocab - 1) if docs_per_row > 1 else None
        out.append((inputs.to(device), labels.to(device), None if doc_ids is None else doc_ids.to(device)))
    return out


def train_step(model, optimizer, batch, autocast_dtype):
    inputs, labels, doc_ids = batch
    with torch.autocast(device_type=inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(inputs, doc_ids=doc_ids)
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten()) + out.aux_loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for moe in model.moe_layers():
        moe.update_expert_bias()
    return loss


def profile_step(model, optimizer, batch, device, top=25) -> list[dict]:
    """The operators of one training step, most expensive first (device time on CUDA, CPU time elsewhere)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(model, optimizer, batch, None)
        synchronize(device)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
    return [{"name": e.key, "calls": e.count, "time_ms": getattr(e, key, 0.0) / 1000} for e in events]


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    param_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    base = load_preset(args.preset, args.override)
    variants = args.variants.split(",")

    models, optimizers = {}, {}
    for variant in variants:
        torch.manual_seed(0)
        residual, _, impl = variant.partition(":")
        fields = {**base, "residual": residual, **({"attnres_impl": impl} if impl else {})}
        model = build_model(fields).to(device=device, dtype=param_dtype)
        models[variant] = model
        optimizers[variant] = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batches = make_batches(4, args.micro_batch, args.seq_len, base["vocab_size"], args.docs_per_row, device)

    for variant in variants:
        for i in range(args.warmup):
            train_step(models[variant], optimizers[variant], batches[i % len(batches)], None)
    synchronize(device)

    step_times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            synchronize(device)
            start = time.perf_counter()
            for i in range(args.steps):
                train_step(models[variant], optimizers[variant], batches[i % len(batches)], None)
            synchronize(device)
            step_times[variant].append((time.perf_counter() - start) / args.steps)

    tokens_per_step = args.micro_batch * args.seq_len
    peak = peak_flops_per_device(device)
    results = {}
    for variant in variants:
        model = models[variant]
        median = statistics.median(step_times[variant])
        tokens_per_s = tokens_per_step / median
        flops_per_token = model.flops_per_token(args.seq_len)
        results[variant] = {
            "step_time_s_median": median,
            "step_time_s_per_round": step_times[variant],
            "tokens_per_s": tokens_per_s,
            "train_flops_per_token": flops_per_token,
            "achieved_tflops": flops_per_token * tokens_per_s / 1e12,
            "mfu": model_flops_utilization(flops_per_token, tokens_per_s, peak, 1),
            "total_parameters": model.num_parameters(),
            "active_parameters": model.num_active_parameters(),
        }
    if "standard" in results:
        for variant in variants:
            if variant != "standard":
                results[f"{variant}_overhead"] = (
                    results[variant]["step_time_s_median"] / results["standard"]["step_time_s_median"] - 1)
    if args.profile:
        for variant in variants:
            results[variant]["profile_top"] = profile_step(models[variant], optimizers[variant], batches[0], device)
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    report = {"benchmark": "bench_train", **environment(device), "peak_flops_per_device": peak,
              "config": {**vars(args), "dtype": dtype, "model": base}, "results": results}
    print(f"{args.preset} on {report['device']} ({dtype}), {args.micro_batch}x{args.seq_len} tokens/step")
    for variant in variants:
        r = results[variant]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"  {variant:14s} step {1000 * r['step_time_s_median']:8.1f} ms  "
              f"{r['tokens_per_s']:12,.0f} tok/s  MFU {mfu}")
    for key, value in results.items():
        if key.endswith("_overhead"):
            print(f"  {key[: -len('_overhead')]} overhead over standard: {100 * value:+.2f}%")
    write_report(report, args.out, f"bench_train_{args.preset}_{device.type}.json")
    return report


if __name__ == "__main__":
    main()
