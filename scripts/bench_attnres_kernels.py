#!/usr/bin/env python
"""Block AttnRes kernel benchmark: forward + backward of every mix of one block.

One block of S sublayers over N completed block summaries (plus, from the second sublayer on, the block's partial
sum), the way training runs it. Implementations:

  fused   ours: phase 1 once for the S queries, phase 2 per sublayer (attnres_kernels, Triton)
  fla     fla.ops.attnres.fused_attnres, one call per sublayer (each reads every source again)
  torch   the model's torch mix, one per sublayer
  two_phase_torch   the same two phases in torch (attnres_kernels.reference): the CPU stand-in for ``fused``

Beside the times it prints a traffic model (:func:`traffic_model`): HBM bytes one block moves forward + backward
under each design, as a multiple of X = T * D * element bytes and of the compulsory floor, and the kernel launches.
It is arithmetic from the kernels' structure, not a measurement; ``--model-only`` prints and saves just that (no
GPU needed).

Writes JSON (device, versions, shapes, milliseconds, speed-ups, agreement, model figures) under
benchmarks/results/. Needs a CUDA GPU for ``fused`` and ``fla``; ``--dry-run`` runs small shapes on CPU with the
torch implementations only, to check the script itself.

    python scripts/bench_attnres_kernels.py                      # 16K tokens, D = 2048 and 4096, N = 8, S = 6
    python scripts/bench_attnres_kernels.py --model-only         # the traffic model alone, any machine
    python scripts/bench_attnres_kernels.py --dry-run --out /tmp/attnres_dry.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "kernels"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnres_kernels.reference import phase1_reference, phase2_reference  # noqa: E402
from attnres_train.model.attnres import attnres_mix, source_rstd  # noqa: E402
from bench_common import environment, median_seconds, write_report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384, help="tokens per call (batch x sequence)")
    p.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--sources", type=int, default=8, help="N: completed block summaries (b_0 = embedding included)")
    p.add_argument("--block-size", type=int, default=6, help="S: sublayers per block")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--impls", default=None, help="comma list (default: fused,fla,torch on CUDA)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dry-run", action="store_true", help="small shapes on CPU, torch implementations only")
    p.add_argument("--model-only", action="store_true", help="print and save the traffic model only (no timing)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


class BlockInputs:
    """Leaves of one block: completed sources, one partial sum per sublayer after the first, queries, norm
    weights, and an upstream gradient per sublayer output."""

    def __init__(self, N, S, T, D, dtype, device, seed=0):
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

        self.sources = [randn(T, D).requires_grad_(True) for _ in range(N)]
        self.partials = [None] + [randn(T, D).requires_grad_(True) for _ in range(S - 1)]
        self.queries = [randn(D, scale=0.02).float().requires_grad_(True) for _ in range(S)]
        self.key_weights = [torch.ones(D, device=device).requires_grad_(True) for _ in range(S)]
        self.upstream = [randn(T, D) for _ in range(S)]

    def leaves(self):
        return [*self.sources, *[p for p in self.partials if p is not None], *self.queries, *self.key_weights]


def block_torch(x: BlockInputs, eps=1e-6):
    rstd = [source_rstd(v, eps) for v in x.sources]
    outputs = []
    for j, partial in enumerate(x.partials):
        sources, rs = list(x.sources), list(rstd)
        if partial is not None:
            sources.append(partial)
            rs.append(source_rstd(partial, eps))
        stacked = torch.stack(sources).unsqueeze(1)  # [N, B = 1, T, D]
        h, _ = attnres_mix(stacked, torch.stack(rs).unsqueeze(1), x.key_weights[j] * x.queries[j])
        outputs.append(h[0])
    return outputs


def block_two_phase(phase1, phase2):
    def run(x: BlockInputs, eps=1e-6):
        rstd = torch.stack([source_rstd(v, eps) for v in x.sources])
        queries = torch.stack([w * q for w, q in zip(x.key_weights, x.queries)])
        o, lse = phase1(x.sources, rstd, queries)
        outputs = []
        for j, partial in enumerate(x.partials):
            if partial is None:
                outputs.append(o[j])
            else:
                outputs.append(phase2(o[j], lse[j], partial, queries[j], None, eps))
        return outputs
    return run


def block_fla(x: BlockInputs, eps=1e-6):
    from fla.ops.attnres import fused_attnres

    outputs = []
    for j, partial in enumerate(x.partials):
        residuals = list(x.sources) + ([partial] if partial is not None else [])
        outputs.append(fused_attnres(x.queries[j], residuals, x.key_weights[j], rms_eps=eps))
    return outputs


def traffic_model(N: int, S: int, T: int, D: int, element_bytes: int = 2, with_norm: bool = True) -> dict:
    """HBM traffic of one block's mixes, forward + backward, by design (bytes, and multiples of X = T*D*elem).

    A block: S sublayers over N completed sources; sublayers 1..S-1 also mix their partial sum; each mix is
    followed by an RMSNorm that a fused design folds in (``with_norm``). Counted in X: reads and writes of [T, D]
    tensors. Per-token fp32 statistics (no D) are added in bytes. Sources read twice by one program within a
    token tile count once (the second read is served by L2: a tile is a few hundred KB per program).

    floor   what any implementation must move: read each source and partial sum once and write each output
            (forward); read each source, output gradient and partial sum once, write each source and partial-sum
            gradient (backward)
    fused   attnres_kernels.block_attnres: phase 1 writes S outputs that phase 2 reads in the forward and again
            in the backward (its merge gradient needs them); phase-2 backward writes each sublayer's output
            gradient, which the phase-1 backward reads
    fla     fla's fused_attnres, one call per sublayer: each call reads every source (and backward reads them
            again and writes their gradients, which autograd then sums across the S calls)
    """
    X = T * D * element_bytes
    token_stat = T * 4  # one fp32 per token
    partials = S - 1
    floor_fwd = N + partials + S
    floor_bwd = 2 * N + S + 2 * partials
    # fused: phase 1 fwd reads N and writes S outputs; phase 2 of sublayer 0 reads o, writes y (only when a norm
    # is folded; otherwise o_0 is the output), of sublayers 1.. reads o, p and writes y
    fused_fwd = N + S + (2 if with_norm else 0) + 3 * partials
    # phase 2 bwd: sublayer 0 reads dy, o, writes do (norm only); sublayers 1.. read dy, o, p, write do, dp;
    # phase 1 bwd reads N sources and S output gradients, writes N source gradients
    fused_bwd = (3 if with_norm else 0) + 5 * partials + 2 * N + S
    fused_stats = (2 * N * S + 3 * S + N) * token_stat  # logits, dlogits scratch, lse, dlse, stats, drstd
    # fla per sublayer j: forward reads N (+1 partial) writes y; backward reads N (+1), dy, writes N (+1) gradients,
    # and autograd sums the S per-call source gradients (S - 1 adds of 2 reads + 1 write per source)
    fla_fwd = S * (N + 1) - 1
    fla_bwd = sum(2 * (N + (j > 0)) + 1 for j in range(S)) + N * 3 * (S - 1)
    designs = {
        "floor": {"fwd_X": floor_fwd, "bwd_X": floor_bwd, "extra_bytes": 0,
                  "launches_fwd": 1, "launches_bwd": 1},
        "fused": {"fwd_X": fused_fwd, "bwd_X": fused_bwd, "extra_bytes": fused_stats,
                  # fwd: stack queries, stack rstd, phase 1, S x phase 2; bwd: phase 1 (+ zero and sum of its
                  # dQ rows), S x phase 2 (+ sums of its dQ and norm-weight partials)
                  "launches_fwd": 3 + S, "launches_bwd": 3 + S + partials + (S if with_norm else 0)},
        "fla": {"fwd_X": fla_fwd, "bwd_X": fla_bwd, "extra_bytes": 0,
                "launches_fwd": S, "launches_bwd": S + N * (S - 1)},
    }
    floor_total = floor_fwd + floor_bwd
    for name, d in designs.items():
        d["total_X"] = d["fwd_X"] + d["bwd_X"] + d["extra_bytes"] / X
        d["bytes"] = int(round(d["total_X"] * X))
        d["vs_floor"] = d["total_X"] / floor_total
        d["launches"] = d["launches_fwd"] + d["launches_bwd"]
    return {"kind": "model (arithmetic from the kernels' structure, not a measurement)",
            "N": N, "S": S, "T": T, "D": D, "element_bytes": element_bytes, "with_norm": with_norm,
            "X_bytes": X, "designs": designs}


def print_traffic(model: dict, measured_ms: dict | None = None) -> None:
    print(f"traffic model N={model['N']} S={model['S']} T={model['T']} D={model['D']} "
          f"(X = {model['X_bytes'] / 1e6:.0f} MB; model, not measured):")
    for name, d in model["designs"].items():
        line = (f"  {name:6s} fwd {d['fwd_X']:5.1f}X  bwd {d['bwd_X']:5.1f}X  total {d['total_X']:6.1f}X "
                f"= {d['vs_floor']:.2f}x floor, {d['launches']} launches, "
                f"{1000 * d['bytes'] / 3.35e12:.2f} ms at 3.35 TB/s")
        if measured_ms and name in measured_ms:
            line += f"  | measured {measured_ms[name]:.3f} ms"
        print(line)


def implementations(names):
    table = {"torch": block_torch, "two_phase_torch": block_two_phase(phase1_reference, phase2_reference),
             "fla": block_fla}
    if "fused" in names:
        from attnres_kernels.block_attnres import block_phase1, block_phase2

        table["fused"] = block_two_phase(block_phase1, block_phase2)
    return {name: table[name] for name in names}


def time_block(fn, x: BlockInputs, device, repeats, warmup):
    def once():
        for leaf in x.leaves():
            leaf.grad = None
        torch.autograd.backward(fn(x), x.upstream)

    return median_seconds(once, device, repeats, warmup)


def main(argv=None) -> dict:
    args = parse_args(argv)
    element_bytes = 2 if args.dtype == "bf16" else 4
    if args.model_only:
        models = [traffic_model(args.sources, args.block_size, args.tokens, hidden, element_bytes)
                  for hidden in args.hidden]
        for model in models:
            print_traffic(model)
        report = {"benchmark": "bench_attnres_kernels", "model_only": True, "config": vars(args),
                  "traffic_model": models}
        write_report(report, args.out, "bench_attnres_kernels_traffic_model.json")
        return report
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.dry_run:
        args.tokens, args.hidden, args.repeats, args.warmup = 64, [32, 48], 2, 1
        names = (args.impls or "torch,two_phase_torch").split(",")
        if device.type == "cpu" and args.dtype == "bf16":
            args.dtype = "fp32"
    else:
        if device.type != "cuda":
            raise SystemExit("bench_attnres_kernels: needs a CUDA GPU (use --dry-run to check the script on CPU)")
        names = (args.impls or "fused,fla,torch").split(",")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    impls = implementations(names)

    results = []
    for hidden in args.hidden:
        x = BlockInputs(args.sources, args.block_size, args.tokens, hidden, dtype, device)
        row = {"tokens": args.tokens, "hidden": hidden, "sources": args.sources, "block_size": args.block_size}
        reference_out = None
        for name, fn in impls.items():
            median, times = time_block(fn, x, device, args.repeats, args.warmup)
            with torch.no_grad():
                outputs = [o.float() for o in fn(x)]
            if reference_out is None:
                reference_out = outputs
            error = max(((o - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
                        for o, r in zip(outputs, reference_out))
            row[name] = {"ms_median": 1000 * median, "ms_all": [1000 * t for t in times],
                         "max_relative_error_vs_first": error}
        if "fused" in impls and "fla" in impls:
            row["fused_speedup_vs_fla"] = row["fla"]["ms_median"] / row["fused"]["ms_median"]
        if "fused" in impls and "torch" in impls:
            row["fused_speedup_vs_torch"] = row["torch"]["ms_median"] / row["fused"]["ms_median"]
        results.append(row)
        print(f"T={args.tokens} D={hidden} N={args.sources} S={args.block_size} {args.dtype}: " + "  ".join(
            f"{name} {row[name]['ms_median']:.3f} ms" for name in impls))
        row["traffic_model"] = traffic_model(args.sources, args.block_size, args.tokens, hidden, element_bytes)
        print_traffic(row["traffic_model"], {name: row[name]["ms_median"] for name in impls})
        if "fused_speedup_vs_fla" in row:
            print(f"  fused vs fla: {row['fused_speedup_vs_fla']:.2f}x (target >= 1.5x)")

    report = {"benchmark": "bench_attnres_kernels", "dry_run": args.dry_run, **environment(device),
              "config": vars(args), "results": results}
    write_report(report, args.out, f"bench_attnres_kernels_{device.type}.json")
    return report


if __name__ == "__main__":
    main()
