"""Pipeline parallelism (``attnres_train.parallel.pipeline``) against the plain single-process model.

The multi-process tests launch ``_pipeline_worker.py`` under torchrun (CPU, gloo): once with 2 processes
(2 stages) for four cases and once with 4 processes (2 stages x 2 data-parallel replicas). The reference is the
plain ``HybridDecoder`` trained in this process on the same micro-batches with the same optimizer: its loss is
the mean over micro-batches (and replicas) of cross entropy + MoE aux loss, as DeepSpeed's pipeline averages it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnres_train.parallel.pipeline import (
    build_pipeline_module,
    describe_partition,
    pipeline_layers,
    pipeline_parts,
    pipeline_state_dict_to_model,
)
from attnres_train.parallel.pipeline_partition import boundary_bytes, boundary_tensor_count

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "train"))
from cli_helpers import BIN_DIR, REPO_ROOT, describe, run  # noqa: E402

_spec = importlib.util.spec_from_file_location("_pipeline_worker", HERE / "_pipeline_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

SEQ_LEN = 32  # tiny.yaml's linear_chunk_size (16) divides it
BASE = dict(seq_len=SEQ_LEN, micro_batch=2, micro_batches=2, zero_stage=1, seed=3, lr=3e-3)

TWO_STAGE_CASES = [
    # Hybrid KDA + MLA + MoE tiny stack with the sequence-level aux loss on, packed documents.
    dict(BASE, name="standard", model={"residual": "standard", "moe_aux_loss_coef": 0.01}, num_stages=2, steps=3),
    dict(BASE, name="block", model={"residual": "block_attnres", "moe_aux_loss_coef": 0.01}, num_stages=2, steps=3),
    dict(BASE, name="full", model={"residual": "full_attnres"}, num_stages=2, steps=1),
    # Block size 4 sublayers and a cut after one decoder layer (2 sublayers): the partial sum travels.
    dict(BASE, name="block_partial", model={"residual": "block_attnres", "attnres_block_size": 4}, num_stages=2,
         boundaries=[1], steps=2),
    # Every decoder layer recomputed in backward (DeepSpeed's non-reentrant checkpoint), 3 layers on one stage.
    dict(BASE, name="block_checkpointed", model={"residual": "block_attnres", "moe_aux_loss_coef": 0.01},
         num_stages=2, boundaries=[1], activation_checkpoint_interval=1, steps=2),
    # The two-phase Block AttnRes (torch phases on CPU): each stage batches only its own sublayers' queries, and
    # the block cut by the boundary is finished on stage 1 from the partial sum it received.
    dict(BASE, name="block_fused", model={"residual": "block_attnres", "attnres_block_size": 4,
                                          "attnres_impl": "fused"}, num_stages=2, boundaries=[1], steps=2),
    # Tied embeddings: stage 0 embeds and the last stage projects with its own copy of the same matrix.
    dict(BASE, name="tied", model={"residual": "block_attnres", "tie_embeddings": True}, num_stages=2, steps=3),
]
DATA_PARALLEL_CASE = dict(
    BASE, name="block_dp2", model={"residual": "block_attnres", "moe_aux_loss_coef": 0.01}, num_stages=2, steps=3
)


# --- launching -------------------------------------------------------------------------------------------------


def launch(cases: list[dict], nproc: int, tmp_path: Path) -> dict[str, list[dict]]:
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    command = [str(BIN_DIR / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
               str(HERE / "_pipeline_worker.py"), str(cases_file), str(tmp_path)]
    result = run(command, cwd=REPO_ROOT, timeout=240.0, OMP_NUM_THREADS="1")
    assert result.returncode == 0, describe(result)
    return {
        case["name"]: [torch.load(tmp_path / f"{case['name']}_rank{r}.pt") for r in range(nproc)] for case in cases
    }


@pytest.fixture(scope="module")
def two_stage_runs(tmp_path_factory):
    return launch(TWO_STAGE_CASES, 2, tmp_path_factory.mktemp("pipeline_2x1"))


@pytest.fixture(scope="module")
def data_parallel_runs(tmp_path_factory):
    return launch([DATA_PARALLEL_CASE], 4, tmp_path_factory.mktemp("pipeline_2x2"))


# --- single-process reference ----------------------------------------------------------------------------------


def reference_run(case: dict, data_parallel: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses per step and first-step gradients of the plain model on the same global batches."""
    model = worker.build_seeded_model(case["model"], case["seed"])
    model.train()
    optimizer = worker.optimizer_for(model.parameters(), case)
    shards = data_parallel * case["micro_batches"]
    losses, first_grads = [], None
    for step in range(case["steps"]):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for shard in range(shards):
            (input_ids, doc_ids), labels = worker.micro_batch(case, step, shard)
            out = model(input_ids, doc_ids)
            lm = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=-100)
            loss = (lm + out.aux_loss) / shards
            loss.backward()
            total += float(loss.detach())
        losses.append(total)
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(model.parameters(), worker.GRADIENT_CLIPPING)
        optimizer.step()
        for moe in model.moe_layers():
            moe.update_expert_bias()
    return losses, first_grads


def pipeline_first_grads(records: list[dict]) -> dict[str, torch.Tensor]:
    """First-step gradients of the whole model: each stage's, averaged over its data-parallel replicas."""
    summed: dict[str, list[torch.Tensor]] = {}
    for record in records:
        for name, grad in record["grads"].items():
            summed.setdefault(name, []).append(grad)
    return {name: torch.stack(grads).mean(0) for name, grads in summed.items()}


def assert_matches_reference(case: dict, records: list[dict], data_parallel: int, check_grads: bool = True):
    ref_losses, ref_grads = reference_run(case, data_parallel)
    for record in records:  # every rank reports the data-parallel average loss
        assert len(record["losses"]) == case["steps"]
        for step, (got, want) in enumerate(zip(record["losses"], ref_losses)):
            assert abs(got - want) <= 1e-5 * abs(want), (case["name"], step, record["losses"], ref_losses)
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in records)
    if not check_grads:
        return
    got = pipeline_first_grads(records)
    assert set(got) == set(ref_grads), set(got) ^ set(ref_grads)
    for name, want in ref_grads.items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# --- multi-process tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["standard", "block"])
def test_two_stages_match_plain_model_grads_and_trajectory(two_stage_runs, name):
    case = next(c for c in TWO_STAGE_CASES if c["name"] == name)
    records = two_stage_runs[name]
    assert sorted(r["stage"] for r in records) == [0, 1]
    assert_matches_reference(case, records, data_parallel=1)
    # The loss moved: the optimizer really stepped between the compared losses.
    assert records[0]["losses"][0] != records[0]["losses"][-1]


def test_full_attnres_two_stages(two_stage_runs):
    case = next(c for c in TWO_STAGE_CASES if c["name"] == "full")
    assert_matches_reference(case, two_stage_runs["full"], data_parallel=1)


def test_boundary_inside_block_sends_partial_sum(two_stage_runs):
    case = next(c for c in TWO_STAGE_CASES if c["name"] == "block_partial")
    records = two_stage_runs["block_partial"]
    assert records[0]["parts"] == [0, 2, 6]  # embedding + layer 0 | layers 1-3 + output
    assert_matches_reference(case, records, data_parallel=1)


def test_activation_checkpointing_matches(two_stage_runs):
    case = next(c for c in TWO_STAGE_CASES if c["name"] == "block_checkpointed")
    assert_matches_reference(case, two_stage_runs["block_checkpointed"], data_parallel=1)


def test_fused_attnres_across_stages(two_stage_runs):
    case = next(c for c in TWO_STAGE_CASES if c["name"] == "block_fused")
    assert_matches_reference(case, two_stage_runs["block_fused"], data_parallel=1)


def test_tied_embeddings_stay_tied_across_stages(two_stage_runs):
    case = next(c for c in TWO_STAGE_CASES if c["name"] == "tied")
    records = sorted(two_stage_runs["tied"], key=lambda r: r["stage"])
    assert records[0]["parts"] == [0, 3, 7]  # embedding + 2 layers | 2 layers + output + tied head
    assert_matches_reference(case, records, data_parallel=1)
    first, last = (r["weights_after_first_step"]["embed_tokens.weight"] for r in records)
    assert torch.equal(first, last)  # both copies took the same (summed-gradient) update


def test_two_stages_two_data_parallel_replicas(data_parallel_runs):
    records = data_parallel_runs["block_dp2"]
    assert sorted((r["stage"], r["dp_rank"]) for r in records) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert_matches_reference(DATA_PARALLEL_CASE, records, data_parallel=2)


# --- in-process tests ------------------------------------------------------------------------------------------


def _wire_chain(model, boundaries):
    """Run the pipeline layers in sequence with the wire format at ``boundaries``; return output and wires."""
    layers = pipeline_layers(model)
    for b in boundaries:
        layers[b].emits_wire = True  # pipeline index b = decoder layer b - 1, the last before the cut
    wires = []
    (input_ids, doc_ids), labels = worker.micro_batch(dict(BASE, micro_batch=3), 0, 0)
    x = (input_ids, doc_ids)
    for layer in layers:
        x = layer(x)
        if layer.emits_wire:
            wires.append(x)
    return x, wires, (input_ids, doc_ids)


@pytest.mark.parametrize(
    "residual, block_size, boundaries",
    [
        ("standard", 2, (1, 2, 3)),
        ("block_attnres", 2, (1, 2, 3)),
        ("block_attnres", 4, (1, 2, 3)),
        ("block_attnres", 3, (1, 2, 3)),
        ("full_attnres", 2, (1, 2, 3)),
    ],
)
def test_boundary_tensors_match_accounting_and_model(residual, block_size, boundaries):
    model = worker.build_seeded_model({"residual": residual, "attnres_block_size": block_size,
                                       "moe_aux_loss_coef": 0.01}, seed=1).double()
    (logits, aux), wires, (input_ids, doc_ids) = _wire_chain(model, boundaries)
    B, T, D = input_ids.shape[0], input_ids.shape[1], model.config.hidden_size
    for layers_before, wire in zip(boundaries, wires):
        *activations, aux_1, doc_ids_sent, marker = wire
        count = boundary_tensor_count(residual, block_size, layers_before)
        flat = [a.reshape(-1, B, T, D) for a in activations]
        assert sum(a.shape[0] for a in flat) == count
        assert all(a.shape[1:] == (B, T, D) for a in flat)
        sent_bytes = sum(a.numel() * a.element_size() for a in activations)
        assert sent_bytes == boundary_bytes(residual, block_size, layers_before, B, T, D, 8)
        # Partial sum travels exactly when the cut is inside a block.
        inside_block = residual == "block_attnres" and (2 * layers_before) % block_size != 0
        assert len(activations) == 1 + int(inside_block)
        assert all(t.grad_fn is not None for t in (*activations, aux_1))
        assert aux_1.shape == (1,) and doc_ids_sent.dtype == torch.int64 and torch.equal(doc_ids_sent, doc_ids)
        assert marker.dtype == torch.int64 and marker.numel() == 1
    # Decoding the wire and recomputing the source statistics changes nothing, forward or backward.
    ref = model(input_ids, doc_ids)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(aux[0], ref.aux_loss, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad((logits.square().mean() + aux.sum()), list(model.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad((ref.logits.square().mean() + ref.aux_loss), list(model.parameters()),
                                    allow_unused=True)
    for got, want in zip(grads, ref_grads):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_layers_share_model_parameters_and_names_map_back():
    model = worker.build_seeded_model({}, seed=0)
    layers = pipeline_layers(model)
    pipe_state = {f"{i}.{k}": v for i, layer in enumerate(layers) for k, v in layer.state_dict(keep_vars=True).items()}
    mapped = pipeline_state_dict_to_model(pipe_state, model.config.num_layers)
    model_state = model.state_dict(keep_vars=True)
    assert set(mapped) == set(model_state)
    assert all(mapped[k] is model_state[k] for k in model_state)  # the same tensors, not copies


def test_partition_keeps_embedding_first_and_output_last():
    model = worker.build_seeded_model({}, seed=0)
    partition = describe_partition(model, 2, SEQ_LEN)
    parts = pipeline_parts(partition, model.config.num_layers)
    assert parts[0] == 0 and parts[-1] == model.config.num_layers + 2
    assert parts[1] == partition.boundaries[0] + 1


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_stages"):
        build_pipeline_module(worker.build_seeded_model({}, seed=0), 0, SEQ_LEN)
    with pytest.raises(TypeError, match="HybridDecoder"):
        build_pipeline_module(torch.nn.Linear(2, 2), 2, SEQ_LEN)
    with pytest.raises(ValueError, match="pipeline_boundaries"):
        describe_partition(worker.build_seeded_model({}, seed=0), 2, SEQ_LEN, boundaries=[4])
