#!/usr/bin/env python
"""Expert-GEMM throughput against tokens per expert: the curve that motivates expert parallelism.

One MoE layer's routed experts (SwiGLU: gate, up, down grouped GEMMs through ``MoE.expert_ffn``) run on
``experts x tokens_per_expert`` rows already sorted by expert, forward and backward. Few tokens per expert means
small GEMMs that leave the device idle; expert parallelism over E ranks multiplies the tokens each local expert
sees by E for the same micro-batch. Reported per point: median seconds, tokens/s (routed pairs/s) and achieved
TFLOP/s (6 x 2 x D x F x pairs: three matmuls, forward + backward).

    python scripts/bench_expert_gemm.py                      # the 48B expert shape (D 2304, F 1024), CPU-sized
    python scripts/bench_expert_gemm.py --dry-run --out /tmp/expert_gemm.json   # tiny shapes, seconds

Default: 8 local experts of the ``kimi_linear_48b_a3b`` shape, 8 .. 1024 tokens per expert, bf16 on CUDA and
fp32 on CPU. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import environment, median_seconds, write_report  # noqa: E402

from attnres_train.model.moe import MoE  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2304)
    parser.add_argument("--expert-ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8, help="local experts (256 / EP on the 48B model)")
    parser.add_argument("--tokens-per-expert", type=int, nargs="+", default=[8, 32, 128, 512, 1024])
    parser.add_argument("--impl", choices=("auto", "native", "loop"), default="auto", help="grouped GEMM path")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes and two points (a smoke run)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/expert_gemm_<device>.json)")
    return parser.parse_args(argv)


def measure(moe: MoE, tokens_per_expert: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    experts, hidden, width = moe.num_experts, moe.hidden_size, moe.expert_ffn_dim
    rows = experts * tokens_per_expert
    x_RD = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    pairs_per_expert_E = torch.full((experts,), tokens_per_expert, device=device, dtype=torch.int64)

    def step() -> None:
        y_RD = moe.expert_ffn(x_RD, pairs_per_expert_E)
        y_RD.backward(torch.ones_like(y_RD))
        moe.zero_grad(set_to_none=True)
        x_RD.grad = None

    seconds, _ = median_seconds(step, device, repeats=repeats, warmup=1)
    flops = 6 * 2 * hidden * width * rows
    return {"tokens_per_expert": tokens_per_expert, "rows": rows, "seconds_median": seconds,
            "tokens_per_s": rows / seconds, "tflops": flops / seconds / 1e12}


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        args.hidden, args.expert_ffn, args.experts, args.repeats = 64, 32, 4, 2
        args.tokens_per_expert = [4, 32]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    moe = MoE(args.hidden, num_experts=args.experts, top_k=1, expert_ffn_dim=args.expert_ffn,
              num_shared_experts=0, grouped_mm_impl=args.impl).to(device=device, dtype=dtype)
    results = []
    for tokens in args.tokens_per_expert:
        row = measure(moe, tokens, device, dtype, args.repeats)
        results.append(row)
        print(f"{tokens:6d} tokens/expert: {row['tokens_per_s']:12,.0f} tokens/s  {row['tflops']:.3f} TFLOP/s",
              flush=True)
    report = {**environment(device), "dry_run": args.dry_run, "dtype": str(dtype).replace("torch.", ""),
              "config": {"hidden": args.hidden, "expert_ffn": args.expert_ffn, "local_experts": args.experts,
                         "impl": args.impl, "repeats": args.repeats, "threads": torch.get_num_threads()},
              "results": results}
    where = "cuda" if device.type == "cuda" else f"{platform.machine()}-{torch.get_num_threads()}cpu"
    name = f"expert_gemm_{where}.json"
    write_report(report, args.out, name)
    return report


if __name__ == "__main__":
    main()
