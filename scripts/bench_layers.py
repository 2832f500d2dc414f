#!/usr/bin/env python
"""Sequence-mixer throughput: one KDA / GDN / MLA (or GQA) layer of a preset, forward + backward, at several
sequence lengths (one row of T tokens each).

Reports milliseconds, tokens/s and achieved TFLOP/s from the layer's exact FLOP count (3x its forward count for
forward + backward), and the fraction of the device's bf16 peak. Writes JSON under benchmarks/results/.

    python scripts/bench_layers.py --preset kimi_linear_1b --tokens 4096 16384 65536
    python scripts/bench_layers.py --dry-run --out /tmp/layers_dry.json      # tiny shapes on CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import environment, median_seconds, write_report  # noqa: E402

from attnres_train.model import ModelConfig  # noqa: E402
from attnres_train.model.slots import build_sequence_mixer  # noqa: E402
from attnres_train.train.metrics import peak_flops_per_device  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="kimi_linear_1b")
    p.add_argument("--mixers", default="kda,gdn,mla")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--override", action="append", default=[], help="model field override, e.g. linear_num_heads=16")
    p.add_argument("--dry-run", action="store_true", help="tiny preset and lengths on CPU")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def time_layer(layer, x, repeats, warmup, device):
    grad = torch.randn_like(x)

    def once():
        x.grad = None
        layer(x, None).backward(grad)

    return median_seconds(once, device, repeats, warmup)[0]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        args.preset, args.tokens, args.repeats, args.warmup = "tiny", [64, 128], 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    raw = yaml.safe_load((REPO / "configs" / "model" / f"{args.preset}.yaml").read_text())
    for item in args.override:
        key, value = item.split("=", 1)
        raw[key] = yaml.safe_load(value)
    cfg = ModelConfig.from_mapping(raw)
    peak = peak_flops_per_device(device)

    results = []
    for kind in args.mixers.split(","):
        torch.manual_seed(0)
        layer = build_sequence_mixer(kind, cfg).to(device=device, dtype=dtype)
        for tokens in args.tokens:
            x = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
            try:
                seconds = time_layer(layer, x, args.repeats, args.warmup, device)
            except torch.OutOfMemoryError:
                results.append({"mixer": kind, "tokens": tokens, "error": "out of memory"})
                print(f"{kind:4s} T={tokens:6d}: out of memory")
                torch.cuda.empty_cache()
                continue
            flops = 3 * layer.forward_flops_per_token(tokens) * tokens
            row = {"mixer": kind, "tokens": tokens, "ms": 1000 * seconds, "tokens_per_s": tokens / seconds,
                   "tflops": flops / seconds / 1e12,
                   "fraction_of_peak": None if peak is None else flops / seconds / peak,
                   "parameters": sum(p.numel() for p in layer.parameters())}
            results.append(row)
            share = "" if row["fraction_of_peak"] is None else f"  {100 * row['fraction_of_peak']:.1f}% of peak"
            print(f"{kind:4s} T={tokens:6d}: {row['ms']:9.2f} ms  {row['tokens_per_s']:12,.0f} tok/s  "
                  f"{row['tflops']:7.2f} TFLOP/s{share}")

    report = {"benchmark": "bench_layers", "dry_run": args.dry_run, **environment(device),
              "peak_flops_per_device": peak, "config": {**vars(args), "dtype": dtype_name, "model": raw},
              "results": results}
    write_report(report, args.out, f"bench_layers_{args.preset}_{device.type}.json")
    return report


if __name__ == "__main__":
    main()
