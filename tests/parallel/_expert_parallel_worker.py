"""Worker launched by ``test_expert_parallel.py`` under torchrun (gloo): expert parallelism against one process.

``python _expert_parallel_worker.py OUT_DIR``. Every rank builds the same seeded tiny MoE model twice: a whole
reference that trains on the global batch, and an expert-parallel copy (``shard_experts`` over all ranks) that
trains on this rank's rows, both in fp64. Rows hold packed documents. Each rank's loss is its token-loss sum over the global
label count, so gradients summed over ranks are the reference's. For a few SGD steps with the aux-loss-free bias
update from the all-reduced loads, it writes ``OUT_DIR/rank{R}.pt`` with both losses, the largest gradient
difference (shared parameters summed over ranks, this rank's expert slice against the reference's slice), the
bias/load statistics of both, and the all-to-all bytes counted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from _pipeline_worker import build_seeded_model

STEPS = 3
ROWS_PER_RANK, SEQ = 2, 32
LR = 0.5


def global_batch(world: int):
    generator = torch.Generator().manual_seed(7)
    rows = ROWS_PER_RANK * world
    input_ids = torch.randint(0, 258, (rows, SEQ), generator=generator)
    doc_ids = torch.zeros(rows, SEQ, dtype=torch.int64)
    for row in range(rows):  # 2-3 packed documents per row, cut where the row index says
        doc_ids[row, 9 + row:] = 1
        if row % 2:
            doc_ids[row, 20:] = 2
    labels = input_ids.roll(-1, dims=1)
    labels[doc_ids != doc_ids.roll(-1, dims=1)] = -100
    labels[:, -1] = -100
    return input_ids, doc_ids, labels


def loss_sum(model, input_ids, doc_ids, labels):
    out = model(input_ids, doc_ids=doc_ids)
    lm = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1),
                         ignore_index=-100, reduction="sum")
    return lm, out.aux_loss


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from attnres_train.parallel.expert_parallel import is_expert_parameter, mark_expert_parameters, shard_experts

    overrides = {"moe_aux_loss_coef": 0.01}
    # fp64: the reduction-order noise of fp32 would hide a wrong token or scale behind the tolerance.
    reference = build_seeded_model(overrides, seed=3).double()
    sharded = build_seeded_model(overrides, seed=3).double()
    dispatches = shard_experts(sharded, world, rank, dist.group.WORLD)
    mark_expert_parameters(sharded, world)
    input_ids, doc_ids, labels = global_batch(world)
    labelled = float((labels != -100).sum())
    mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    records = []
    for step in range(STEPS):
        for model in (reference, sharded):
            model.zero_grad(set_to_none=True)
        ref_lm, ref_aux = loss_sum(reference, input_ids, doc_ids, labels)
        (ref_lm / labelled + ref_aux).backward()
        lm, aux = loss_sum(sharded, input_ids[mine], doc_ids[mine], labels[mine])
        (lm / labelled + aux / world).backward()
        loss = lm.detach().clone()
        dist.all_reduce(loss)

        worst = 0.0
        ref_params = dict(reference.named_parameters())
        for name, param in sharded.named_parameters():
            grad = param.grad.detach().clone()
            expected = ref_params[name].grad
            if is_expert_parameter(param):
                num_local = param.shape[0]
                expected = expected[rank * num_local:(rank + 1) * num_local]
            else:
                dist.all_reduce(grad)
                param.grad.copy_(grad)
            worst = max(worst, float((grad - expected).abs().max() / (expected.abs().max() + 1e-12)))

        with torch.no_grad():  # the same SGD step on both, so later steps compare updated models too
            for param in sharded.parameters():
                param -= LR * param.grad
            for param in reference.parameters():
                param -= LR * param.grad
        stats, ref_stats = [], []
        for moe, ref_moe in zip(sharded.moe_layers(), reference.moe_layers()):
            counts = moe.tokens_per_expert.clone()
            dist.all_reduce(counts)
            stats.append(moe.update_expert_bias(counts))
            ref_stats.append(ref_moe.update_expert_bias())
        records.append({"loss": float(loss) / labelled, "reference_loss": float(ref_lm) / labelled,
                        "worst_relative_grad_difference": worst, "stats": stats, "reference_stats": ref_stats,
                        "all_to_all_bytes": sum(d.take_bytes_sent() for d in dispatches)})
    torch.save(records, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
