"""``attnres-plan``: rank the parallel layouts of a model preset on a cluster by tokens/s, with per-GPU memory.

    attnres-plan --model kimi_linear_48b_a3b --seq-len 4096 --global-batch 1024 --gpu h100-80gb --nodes 8

Prints a Markdown table (``--rows`` of them; layouts that do not fit are marked NO and listed after the ones
that do). ``--json PATH`` also writes every evaluated layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .hardware import GB, GPUS, Cluster


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="attnres-plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a preset under configs/model (e.g. kimi_linear_48b_a3b)")
    parser.add_argument("--seq-len", type=_positive(int), default=4096)
    parser.add_argument("--global-batch", type=_positive(int), default=1024, help="sequences per optimizer step")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb")
    parser.add_argument("--gpus-per-node", type=_positive(int), default=8)
    parser.add_argument("--nodes", type=_positive(int), default=8)
    parser.add_argument("--memory-gb", type=_positive(float), help="memory per GPU (default: the GPU's)")
    parser.add_argument("--intra-node-gbps", type=_positive(float), help="GB/s per GPU in a node (default: NVLink)")
    parser.add_argument("--inter-node-gbps", type=_positive(float), default=50.0,
                        help="GB/s per GPU between nodes (default 50: one 400 Gb/s NIC per GPU)")
    parser.add_argument("--mfu", type=_positive(float), default=0.4, help="assumed model FLOP utilisation")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--rows", type=_positive(int), default=15)
    parser.add_argument("--json", type=Path, help="also write every evaluated layout here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import yaml

    from attnres_train.model import ModelConfig
    from attnres_train.train.cli import config_dir

    from .layouts import format_table, rank_plans
    from .model_facts import model_facts

    preset = config_dir() / "model" / f"{args.model}.yaml"
    if not preset.is_file():
        names = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))
        raise SystemExit(f"error: --model {args.model}: no preset {preset}; expected one of {names}")
    if args.mfu > 1:
        raise SystemExit(f"error: --mfu {args.mfu}: expected a fraction in (0, 1]")
    memory, peak, nvlink = GPUS[args.gpu]
    cluster = Cluster(args.gpus_per_node, args.nodes, (args.memory_gb or memory / GB) * GB, peak,
                      (args.intra_node_gbps or nvlink / GB) * GB, args.inter_node_gbps * GB, args.mfu)
    config = ModelConfig.from_mapping(yaml.safe_load(preset.read_text()))
    facts = model_facts(config, args.seq_len)
    plans = rank_plans(facts, cluster, args.global_batch, precision=args.precision)
    if not plans:
        raise SystemExit(f"error: --global-batch {args.global_batch}: no layout of {cluster.gpus} GPUs divides it "
                         "into whole micro-batches; use a multiple of the GPU count")
    fitting = sum(plan.fits for plan in plans)
    print(f"{args.model}: {facts.total_parameters / 1e9:.2f}B parameters, seq_len {args.seq_len}, global batch "
          f"{args.global_batch} sequences, {facts.train_flops_per_token / 1e9:.2f} GFLOP/token (train)")
    print(f"cluster: {cluster.describe()}")
    print(f"{len(plans)} layouts, {fitting} fit; memory in GiB per GPU (the fullest pipeline stage)\n")
    print(format_table(plans, args.rows))
    if args.json:
        args.json.write_text(json.dumps([{**asdict(plan.layout), "memory": asdict(plan.memory),
                                          "memory_total": plan.memory.total, "time": asdict(plan.time),
                                          "step_time": plan.time.total, "tokens_per_second": plan.tokens_per_second,
                                          "fits": plan.fits} for plan in plans], indent=1))


if __name__ == "__main__":
    main()
