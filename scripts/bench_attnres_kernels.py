#!/usr/bin/env python
"""Block AttnRes kernel benchmark: forward + backward of every mix of one block.

One block of S sublayers over N completed block summaries (plus, from the second sublayer on, the block's partial
sum), the way training runs it. Implementations:

  fused   ours: phase 1 once for the S queries, one merge per sublayer adding the partial sum (attnres_kernels)
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

from attnres_kernels.reference import block_merge_torch, block_phase1_torch  # noqa: E402
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


def _partial_sums(x: BlockInputs):
    """p_j = f_0 + ... + f_{j-1} from the stand-in sublayer outputs ``x.partials[1:]`` (f_{j-1} = partials[j]),
    with the adds the model makes outside a fused merge."""
    sums, running = [None], None
    for f in x.partials[1:]:
        running = f if running is None else running + f
        sums.append(running)
    return sums


def block_torch(x: BlockInputs, eps=1e-6):
    rstd = [source_rstd(v, eps) for v in x.sources]
    outputs = []
    for j, partial in enumerate(_partial_sums(x)):
        sources, rs = list(x.sources), list(rstd)
        if partial is not None:
            sources.append(partial)
            rs.append(source_rstd(partial, eps))
        stacked = torch.stack(sources).unsqueeze(1)  # [N, B = 1, T, D]
        h, _ = attnres_mix(stacked, torch.stack(rs).unsqueeze(1), x.key_weights[j] * x.queries[j])
        outputs.append(h[0])
    return outputs


def block_two_phase(phase1, merge, source_gradients=None):
    def run(x: BlockInputs, eps=1e-6):
        rstd = [source_rstd(v, eps).float() for v in x.sources]
        o, lse, params = phase1(x.sources, rstd, x.queries, x.key_weights,
                                None if source_gradients is None else source_gradients())
        outputs, partial = [], None
        for j, previous_output in enumerate(x.partials):
            h, merged = merge(o[j], lse[j], previous_output, partial, params, j, None, eps)
            partial = merged if merged is not None else partial
            outputs.append(h)
        return outputs
    return run


def block_fla(x: BlockInputs, eps=1e-6):
    from fla.ops.attnres import fused_attnres

    outputs = []
    for j, partial in enumerate(_partial_sums(x)):
        residuals = list(x.sources) + ([partial] if partial is not None else [])
        outputs.append(fused_attnres(x.queries[j], residuals, x.key_weights[j], rms_eps=eps))
    return outputs


def traffic_model(N: int, S: int, T: int, D: int, element_bytes: int = 2, with_norm: bool = True) -> dict:
    """HBM traffic of one block's residual stream, forward + backward, by design (multiples of X = T*D*elem).

    Scope, the same for every design: everything between the sublayers' own kernels for one block of S
    sublayers over N completed sources, in the steady state (the sources already hold gradient from later
    blocks): taking each sublayer output f_j in, handing each sublayer its normed input x_j, forming the block
    summary b_n and its rstd; backward, taking each dx_j and db_n in, handing each df_j back, adding the sources'
    gradients. Per-token fp32 statistics (no D) are added in bytes; tiles a program re-reads are L2 hits.

    floor (what ANY implementation must move, the sublayers being opaque kernels in between):
      fwd  N  read the sources once (all S queries together)
           S  write x_j
           2(S-1)  hand o_j (the mix of the completed sources) across sublayer j-1: x_j needs p_j, which needs
                   f_{j-1}; storing o_j once and reading it once is the cheapest carrier (recomputing reads N)
           3S-2    the partial-sum chain: read f_0 as p_1, then read p_{j-1} and f_{j-1} and write p_j, and
                   b_n = p_{S-1} + f_{S-1} written (what the standard residual's add costs too)
      bwd  S  read dx_j;  2(S-1)  the partial-sum gradient chain (read the later uses' gradient, write df_{j-1});
           2S-1  read o_j, p_j again for the merge and norm gradients (o_0 for sublayer 0's norm);
           2(S-1)  hand do_j (j >= 1) to the phase-1 backward, which needs all of them at once (running it per
                   sublayer would read the N sources S times); 3N  read each source and its gradient so far,
                   write the sum
    issue_floor  the issue's 51X: reads/writes as if every partial sum were given up front; no design meets
           it, since the sublayers' data dependency forces the o_j/do_j hand-overs and the partial-sum chain
    fused  attnres_kernels.block_attnres as it is now: phase 1 (which also writes x_0 from its own tile of o_0,
           and o_0 for the first merge's backward), one merge per later sublayer (partial-sum update folded in),
           the close; backward: the merges, then phase 1 (sublayer 0's merge writes do_0 instead of phase 1
           forming it)
    previous  the previous two-phase design with its glue in the model counted: torch adds for the partial
           sum and autograd sums of its gradient, an eager fp32 rstd of each new summary and its backward, source
           gradients written fresh and summed by autograd
    fla    fla's fused_attnres, one call per sublayer, plus the same partial-sum adds and autograd sums
    """
    X = T * D * element_bytes
    token_stat = T * 4  # one fp32 per token
    P = S - 1  # sublayers with a partial sum
    floor_fwd = N + S + 2 * P + (3 * S - 2)
    floor_bwd = S + 2 * P + (2 * S - 1) + 2 * P + 3 * N
    issue_fwd, issue_bwd = N + P + S, 2 * N + S + 2 * P
    norm = 1 if with_norm else 0
    # fused fwd: phase 1 reads N, writes S o_j and x_0 (norm only; o_0 re-read from L2); merge 1 reads o_1, f_0,
    # writes x_1; merges 2.. read o_j, f_{j-1}, p_{j-1}, write p_j, x_j; close reads p_{S-1}, f_{S-1}, writes b_n
    fused_fwd = N + S + norm + 3 * min(P, 1) + 5 * max(P - 1, 0) + 3
    # fused bwd: merges j >= 1 read dx, o, p, the later gradient, write df_{j-1}, do_j; merge 0 reads dx_0, o_0,
    # writes do_0 (norm only); phase 1 reads N sources, N gradients so far, S do_j, writes N gradients
    fused_bwd = 6 * P + 3 * norm + 3 * N + S
    fused_stats = (2 * N * S + 5 * S + 2 * N + 3) * token_stat  # logits, dlogits, lse, dlse, merge stats, rstd
    # previous: phase 1 N + S; phase 2: o, p read, x written; torch partial adds (3 each, P of them incl. b_n);
    # fp32 rstd of b_n in eager torch: read b, write fp32 copy (2), square (2 + 2), mean (2)
    previous_fwd = N + S + 2 * norm + 3 * P + 3 * P + 9
    # phase 2 bwd: dy, o, p read, do, dp written; autograd sums of the partial's gradient (3 each); phase 1 bwd
    # 2N + S; autograd sums of each source's new gradient into its old one (3N); rstd backward of b_n: read
    # b (fp32 copy 2), grad out (2 + 2), then summed into b's gradient (3)
    previous_bwd = 5 * P + 3 * norm + 3 * P + 2 * N + S + 3 * N + 9
    fla_fwd = S * (N + 1) - 1 + 3 * P + 9
    fla_bwd = sum(2 * (N + (j > 0)) + 1 for j in range(S)) + 3 * N * S + 3 * P + 9
    designs = {
        "floor": {"fwd_X": floor_fwd, "bwd_X": floor_bwd, "extra_bytes": 0,
                  # one kernel at each hand-over between sublayer kernels: S forward, S backward
                  "launches_fwd": S, "launches_bwd": S},
        "issue_floor": {"fwd_X": issue_fwd, "bwd_X": issue_bwd, "extra_bytes": 0,
                        "launches_fwd": 1, "launches_bwd": 1},
        "fused": {"fwd_X": fused_fwd, "bwd_X": fused_bwd, "extra_bytes": fused_stats,
                  # fwd: phase 1 (which also copies the 2S query vectors it reads by address, zeroes the
                  # parameter-gradient buffer and forms x_0), S - 1 merges, close; bwd: S merges, phase 1 (the
                  # close passes its gradient through); plus one small host-to-device address table per
                  # phase-1 call each way
                  "launches_fwd": 1 + (S - 1) + 1, "launches_bwd": S + 1, "address_tables": 2},
        "previous": {"fwd_X": previous_fwd, "bwd_X": previous_bwd, "extra_bytes": fused_stats,
                     # fwd: S effective queries + stack, rstd stack, phase 1, S phase 2, P adds, ~5 rstd ops;
                     # bwd: S phase 2 + their 2 partial sums each, P autograd sums, phase 1 + dQ zero/sum,
                     # 2S query-product backwards, N source sums, ~5 rstd backward ops
                     "launches_fwd": S + 2 + 1 + S + P + 5,
                     "launches_bwd": S * 3 + P + 3 + 2 * S + N + 5},
        "fla": {"fwd_X": fla_fwd, "bwd_X": fla_bwd, "extra_bytes": 0,
                "launches_fwd": S + P + 5, "launches_bwd": S + N * S + P + 5},
    }
    floor_total = floor_fwd + floor_bwd
    for d in designs.values():
        d["total_X"] = d["fwd_X"] + d["bwd_X"] + d["extra_bytes"] / X
        d["bytes"] = int(round(d["total_X"] * X))
        d["vs_floor"] = d["total_X"] / floor_total
        d["vs_issue_floor"] = d["total_X"] / (issue_fwd + issue_bwd)
        d["launches"] = d["launches_fwd"] + d["launches_bwd"]
    return {"kind": "model (arithmetic from the kernels' structure, not a measurement)",
            "N": N, "S": S, "T": T, "D": D, "element_bytes": element_bytes, "with_norm": with_norm,
            "X_bytes": X, "designs": designs}


def print_traffic(model: dict, measured_ms: dict | None = None) -> None:
    print(f"traffic model N={model['N']} S={model['S']} T={model['T']} D={model['D']} "
          f"(X = {model['X_bytes'] / 1e6:.0f} MB; model, not measured):")
    for name, d in model["designs"].items():
        line = (f"  {name:11s} fwd {d['fwd_X']:5.1f}X  bwd {d['bwd_X']:5.1f}X  total {d['total_X']:6.1f}X "
                f"= {d['vs_floor']:.2f}x floor ({d['vs_issue_floor']:.2f}x the issue's), {d['launches']} launches, "
                f"{1000 * d['bytes'] / 3.35e12:.2f} ms at 3.35 TB/s")
        if measured_ms and name in measured_ms:
            line += f"  | measured {measured_ms[name]:.3f} ms"
        print(line)


def implementations(names):
    table = {"torch": block_torch, "two_phase_torch": block_two_phase(block_phase1_torch, block_merge_torch),
             "fla": block_fla}
    if "fused" in names:
        from attnres_kernels.block_attnres import SourceGradients, block_merge, block_phase1

        table["fused"] = block_two_phase(block_phase1, block_merge, SourceGradients)
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
