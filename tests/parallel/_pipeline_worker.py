"""Worker launched by ``test_pipeline.py`` under torchrun: trains pipeline-parallel cases and records the results.

``python _pipeline_worker.py CASES_JSON OUT_DIR``. For every case it builds the seeded model, wraps it with
``build_pipeline_module``, runs ``engine.train_batch`` for a few steps on the synthetic batches of
:func:`micro_batch`, and writes ``OUT_DIR/{case}_rank{R}.pt`` with the losses, this rank's stage/DP coordinates
and the gradients of its stage's parameters (model names) captured before the data-parallel reduction of the
first step. The test computes the single-process reference itself from the same helpers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO_ROOT / "configs" / "model" / "tiny.yaml"


def model_config(overrides: dict) -> dict:
    import yaml

    cfg = yaml.safe_load(TINY_MODEL.read_text())
    cfg.update(overrides)
    return cfg


def build_seeded_model(overrides: dict, seed: int):
    from attnres_train.model import build_model

    torch.manual_seed(seed)
    return build_model(model_config(overrides))


def micro_batch(case: dict, step: int, shard: int):
    """``((input_ids, doc_ids), labels)`` of micro-batch ``shard`` (= dp_rank * micro_batches + micro) of ``step``.

    Rows hold 2-3 packed documents at fixed, row-dependent offsets; labels are the next tokens with -100 on the
    last token of each document, as the data pipeline produces them.
    """
    rows, seq_len, vocab = case["micro_batch"], case["seq_len"], 258
    generator = torch.Generator().manual_seed(10_000 * step + shard + 7)
    input_ids = torch.randint(0, vocab, (rows, seq_len), generator=generator)
    doc_ids = torch.zeros(rows, seq_len, dtype=torch.int64)
    for row in range(rows):
        first = 5 + 3 * ((row + shard + step) % 4)
        doc_ids[row, first:] = 1
        if row % 2 == 0:
            doc_ids[row, first + seq_len // 3 :] = 2
    labels = torch.randint(0, vocab, (rows, seq_len), generator=generator)
    ends = torch.ones_like(doc_ids, dtype=torch.bool)
    ends[:, :-1] = doc_ids[:, 1:] != doc_ids[:, :-1]
    labels[ends] = -100
    return (input_ids, doc_ids), labels


def optimizer_for(params, case: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=case["lr"], betas=(0.9, 0.95), eps=case.get("eps", 1e-8), weight_decay=0.1)


GRADIENT_CLIPPING = 1.0  # DeepSpeed clips at 1.0 unless told otherwise; say it, and clip the reference too


def ds_config(case: dict, dp: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": case["micro_batch"],
        "gradient_accumulation_steps": case["micro_batches"],
        "train_batch_size": case["micro_batch"] * case["micro_batches"] * dp,
        "zero_optimization": {"stage": case["zero_stage"]},
        "gradient_clipping": GRADIENT_CLIPPING,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def run_case(case: dict, out_dir: Path) -> None:
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.runtime.pipe import schedule

    from attnres_train.parallel.pipeline import (
        build_pipeline_module,
        local_moe_layers,
        pipeline_state_dict_to_model,
    )

    model = build_seeded_model(case["model"], case["seed"])
    num_layers = model.config.num_layers
    pipe = build_pipeline_module(
        model,
        case["num_stages"],
        case["seq_len"],
        boundaries=case.get("boundaries"),
        activation_checkpoint_interval=case.get("activation_checkpoint_interval", 0),
    )
    dp = dist.get_world_size() // case["num_stages"]
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, optimizer=optimizer_for(pipe.parameters(), case), config=ds_config(case, dp)
    )
    grid = engine.grid
    dp_rank, stage = grid.data_parallel_id, grid.get_stage_id()
    names = {id(p): n for n, p in pipe.named_parameters()}

    captured: dict[str, torch.Tensor] = {}
    original_reduce = type(engine)._INSTRUCTION_MAP[schedule.ReduceGrads]

    def reduce_and_capture(self):
        if not captured:
            for p in self.module.parameters():
                if p.grad is not None:
                    captured[names[id(p)]] = p.grad.detach().clone()
        original_reduce(self)

    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, schedule.ReduceGrads: reduce_and_capture}

    losses = []
    for step in range(case["steps"]):
        shards = [dp_rank * case["micro_batches"] + m for m in range(case["micro_batches"])]
        loss = engine.train_batch(iter([micro_batch(case, step, s) for s in shards]))
        losses.append(float(loss))
        if step == 0:
            weights_after_first_step = pipeline_state_dict_to_model(
                {k: v.detach().clone() for k, v in pipe.state_dict().items()}, num_layers
            )
        for moe in local_moe_layers(pipe):
            counts = moe.tokens_per_expert.clone()
            dist.all_reduce(counts, group=grid.get_data_parallel_group())
            moe.update_expert_bias(counts)

    record = {
        "stage": stage,
        "dp_rank": dp_rank,
        "losses": losses,
        "grads": pipeline_state_dict_to_model(captured, num_layers),
        "parts": list(pipe.parts),
        "weights_after_first_step": weights_after_first_step,
    }
    torch.save(record, out_dir / f"{case['name']}_rank{dist.get_rank()}.pt")
    dist.barrier()


def main() -> None:
    import deepspeed

    cases = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    for case in cases:
        run_case(case, out_dir)


if __name__ == "__main__":
    main()
