#!/usr/bin/env python
"""Per-boundary pipeline traffic of standard / Block AttnRes / Full AttnRes for a preset and stage count.

For each residual mode the stages come from the default pipeline-aware partitioner (FLOP-balanced, boundaries on
AttnRes blocks where it can); the table lists, per stage boundary, the layers before it, whether the partial sum
travels, the number of [B, T, D] tensors sent and the bytes per micro-batch (forward; backward sends the same
amount of gradients back).

    python scripts/pipeline_comm_report.py --preset kimi_linear_48b_a3b --stages 4 8 --seq-len 4096 --micro-batch 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attnres_train.model import build_model  # noqa: E402
from attnres_train.parallel.pipeline_partition import (  # noqa: E402
    boundary_bytes,
    boundary_tensor_count,
    partition_stages,
    stage_costs,
)

RESIDUALS = ("standard", "block_attnres", "full_attnres")


def report(preset: str, stages: list[int], seq_len: int, micro_batch: int, bytes_per_element: int) -> dict:
    base = yaml.safe_load((REPO / "configs" / "model" / f"{preset}.yaml").read_text())
    out = {"preset": preset, "seq_len": seq_len, "micro_batch": micro_batch, "bytes_per_element": bytes_per_element,
           "runs": []}
    for residual in RESIDUALS:
        model = build_model({**base, "residual": residual}, device="meta")
        cfg = model.config
        costs = stage_costs(model, seq_len)
        for num_stages in stages:
            part = partition_stages(costs, num_stages, residual, cfg.attnres_block_size)
            boundaries = []
            for layers_before, on_block in zip(part.boundaries, part.on_block_boundary):
                boundaries.append({
                    "layers_before": layers_before,
                    "partial_sum_travels": residual == "block_attnres" and not on_block,
                    "tensors": boundary_tensor_count(residual, cfg.attnres_block_size, layers_before),
                    "bytes": boundary_bytes(residual, cfg.attnres_block_size, layers_before, micro_batch, seq_len,
                                            cfg.hidden_size, bytes_per_element),
                    "doc_id_bytes": micro_batch * seq_len * 8,
                })
            out["runs"].append({
                "residual": residual,
                "stages": num_stages,
                "stage_layers": [len(r) for r in part.stage_layers(cfg.num_layers)],
                "stage_gflops_per_token": [f / 1e9 for f in part.stage_flops],
                "boundaries": boundaries,
                "max_boundary_bytes": max((b["bytes"] for b in boundaries), default=0),
                "total_bytes": sum(b["bytes"] for b in boundaries),
            })
    return out


def print_report(rep: dict) -> None:
    print(f"{rep['preset']}: micro-batch {rep['micro_batch']} x {rep['seq_len']} tokens, "
          f"{rep['bytes_per_element']} bytes/element (forward activations per micro-batch)")
    for run in rep["runs"]:
        print(f"\n  {run['residual']:14s} P={run['stages']}  layers/stage {run['stage_layers']}  "
              f"GFLOP/token/stage {[round(x, 3) for x in run['stage_gflops_per_token']]}")
        for b in run["boundaries"]:
            partial = " + partial sum" if b["partial_sum_travels"] else ""
            print(f"    after layer {b['layers_before']:3d}: {b['tensors']:3d} tensors{partial:14s} "
                  f"{b['bytes'] / 2**20:10.1f} MiB")
        print(f"    max per boundary {run['max_boundary_bytes'] / 2**20:.1f} MiB, "
              f"all boundaries {run['total_bytes'] / 2**20:.1f} MiB")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="kimi_linear_48b_a3b")
    p.add_argument("--stages", type=int, nargs="+", default=[4, 8])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--bytes-per-element", type=int, default=2, help="2 for bf16 activations")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    rep = report(args.preset, args.stages, args.seq_len, args.micro_batch, args.bytes_per_element)
    print_report(rep)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    return rep


if __name__ == "__main__":
    main()
