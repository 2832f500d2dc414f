"""The run planner against real runs: its memory model against the peak memory of CPU training steps (the small
preset under ZeRO 0, 1 and 2, one and two ranks), its pipeline boundary bytes against what the trainer
writes to ``model_summary.json``; the 48B table's structure; the CLI's refusals. (Its expert all-to-all bytes
are checked against a logged EP=2 run in ``tests/parallel/test_expert_parallel.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnres_train.model import ModelConfig
from attnres_train.plan.hardware import GB, GPUS, Cluster
from attnres_train.plan.layouts import boundary_bytes_per_micro_batch, enumerate_layouts, evaluate, rank_plans
from attnres_train.plan.memory import Layout, estimate_memory
from attnres_train.plan.model_facts import model_facts
from attnres_train.train.cli import config_dir

HERE = Path(__file__).resolve().parent
MEMORY_TOLERANCE = 0.15
# The step-memory estimate is a bound: it may exceed a real run's peak by up to 20% (it holds every gradient and
# every activation at once, which backward never does) and fall short by at most 5%.
PEAK_ABOVE, PEAK_BELOW = 0.20, 0.05


def preset(name: str) -> ModelConfig:
    return ModelConfig.from_mapping(yaml.safe_load((config_dir() / "model" / f"{name}.yaml").read_text()))


# (seq_len, micro_batch, zero_stage, data-parallel ranks, activation checkpointing) of the small preset
LAYOUTS = [(128, 1, 0, 1, False), (128, 2, 1, 1, False), (128, 2, 2, 2, False), (128, 2, 1, 1, True)]


def measure_peak_rises(name: str, layouts) -> list[int]:
    """Peak memory rise of two real training steps per layout, each in its own launch, all at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    processes = []
    for seq_len, micro_batch, zero_stage, ranks, checkpointing in layouts:
        launcher = [sys.executable] if ranks == 1 else [str(Path(sys.executable).parent / "torchrun"), "--standalone",
                                                        f"--nproc_per_node={ranks}"]
        processes.append(subprocess.Popen([*launcher, str(HERE / "_measure_peak_memory.py"), name, str(seq_len),
                                           str(micro_batch), str(zero_stage), str(int(checkpointing)), "2"], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rises = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        rises.append(json.loads(stdout.strip().splitlines()[-1])["peak_rise_bytes"])
    return rises


@pytest.mark.slow
def test_memory_model_matches_measured_peak():
    """fp32, reference (pure-torch) implementations: the planner's peak (weights, gradients, optimizer states,
    and the larger of the step's workspace and one micro-batch's activations) against the peak resident memory of
    two real steps: ZeRO-0 and ZeRO-1 on one rank (micro-batches of 1 and 2, ZeRO-1 also with activation
    checkpointing), ZeRO-2 sharding over 2 data-parallel ranks."""
    config = preset("small")
    report = []
    for (seq_len, micro_batch, zero_stage, ranks, checkpointing), measured in zip(
            LAYOUTS, measure_peak_rises("small", LAYOUTS)):
        layout = Layout(1, 1, ranks, zero_stage, micro_batch, checkpointing)
        predicted = estimate_memory(model_facts(config, seq_len), layout, [range(config.num_layers)], "fp32",
                                    kernels=False, micro_batches_per_step=1).total
        report.append((layout.describe(), round(predicted / 2**20), round(measured / 2**20)))
    for (layout, predicted, measured) in report:
        assert -PEAK_BELOW * measured <= predicted - measured <= PEAK_ABOVE * measured, report


def test_activation_model_matches_what_autograd_saves():
    """The per-token activation model against the bytes autograd actually saves in one forward (tiny preset,
    reference implementations), a check that needs no process of its own."""
    import torch

    from attnres_train.model import build_model
    from attnres_train.model.loss import language_model_loss
    from attnres_train.plan.memory import activation_bytes_per_token

    config = preset("tiny")
    seq_len, rows = 64, 2
    torch.manual_seed(0)
    model = build_model(config)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    input_ids = torch.randint(0, config.vocab_size, (rows, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(input_ids, doc_ids=torch.zeros_like(input_ids))
        language_model_loss(out.logits, input_ids.roll(-1, dims=1))
    measured = sum(saved.values()) / (rows * seq_len)
    # The model also counts the logits' gradient, which exists only during backward (not a saved tensor).
    predicted = activation_bytes_per_token(model_facts(config, seq_len), range(config.num_layers), "fp32",
                                           kernels=False, checkpointing=False, last_stage=True)
    predicted -= 4 * config.vocab_size
    assert abs(predicted - measured) <= MEMORY_TOLERANCE * measured, (predicted, measured)


def test_boundary_bytes_are_the_trainers():
    """What the planner charges a pipeline boundary is what the trainer records in model_summary.json."""
    from attnres_train.train.config import ParallelConfig
    from attnres_train.train.pipelined import pipeline_traffic

    facts = model_facts(preset("small"), 128)
    for stages in (2, 4):
        from attnres_train.parallel.pipeline import describe_partition

        partition = describe_partition(facts.model, stages, 128)
        recorded = pipeline_traffic(facts.model, ParallelConfig(pipeline_stages=stages), 128, 2, "bf16")
        assert boundary_bytes_per_micro_batch(facts, partition, 2, 2) == [
            b["bytes_per_micro_batch"] for b in recorded["boundaries"]]


def test_48b_plan_ranks_fitting_layouts_by_speed():
    config = preset("kimi_linear_48b_a3b")
    facts = model_facts(config, 4096)
    memory, peak, nvlink = GPUS["h100-80gb"]
    cluster = Cluster(8, 8, memory, peak, nvlink, 50 * GB, 0.4)
    plans = rank_plans(facts, cluster, global_batch=1024)
    fitting = [p for p in plans if p.fits]
    assert fitting and len(fitting) < len(plans)
    assert all(p.fits for p in plans[:len(fitting)])
    speeds = [p.tokens_per_second for p in fitting]
    assert speeds == sorted(speeds, reverse=True)
    # Without expert parallelism or ZeRO-3 every rank holds all ~47B routed-expert parameters: none of those fits.
    assert not any(p.fits for p in plans if p.layout.expert_parallel == 1 and p.layout.pipeline_stages == 1
                   and p.layout.zero_stage < 3)
    assert all(p.memory.total > cluster.memory_per_gpu * cluster.usable_memory_fraction for p in plans if not p.fits)
    # Layouts the trainer refuses are never proposed.
    for layout in enumerate_layouts(facts, cluster, 1024):
        assert not (layout.expert_parallel > 1 and layout.zero_stage == 3)
        assert not (layout.pipeline_stages > 1 and layout.zero_stage > 1)
        assert config.num_experts % layout.expert_parallel == 0
    # P x EP is listed, each stage sharding its own experts: ZeRO-1, the one stage DeepSpeed allows with both in bf16.
    pipelined_ep = [p for p in plans if p.layout.pipeline_stages > 1 and p.layout.expert_parallel > 1]
    assert pipelined_ep and {p.layout.zero_stage for p in pipelined_ep} == {1}
    two_stages = evaluate(facts, Layout(2, 8, 32, 1, 1, True), cluster, 1024)
    one_stage = evaluate(facts, Layout(1, 8, 64, 1, 1, True), cluster, 1024)
    assert two_stages.memory.weights < 0.6 * one_stage.memory.weights
    # A replica of two stages runs twice the micro-batches, each through the MoE layers of the fuller stage.
    from attnres_train.parallel.pipeline import describe_partition

    stages = describe_partition(facts.model, 2, 4096).stage_layers(config.num_layers)
    moe = [sum(facts.layers[i].mlp == "moe" for i in layers) for layers in stages]
    assert two_stages.time.all_to_all == pytest.approx(one_stage.time.all_to_all * 2 * max(moe) / sum(moe))
    # Expert parallelism inside a node sends the all-to-all over NVLink, beyond a node over the network.
    base = dict(pipeline_stages=1, data_parallel=64, zero_stage=2, micro_batch=1, activation_checkpointing=True)
    inside = evaluate(facts, Layout(expert_parallel=8, **base), cluster, 1024).time.all_to_all
    across = evaluate(facts, Layout(expert_parallel=16, **base), cluster, 1024).time.all_to_all
    assert across > 5 * inside


@pytest.mark.parametrize("argv,named", [
    (["--model", "no_such_preset"], "--model no_such_preset"),
    (["--model", "tiny", "--mfu", "1.5"], "--mfu 1.5"),
    (["--model", "tiny", "--global-batch", "3", "--nodes", "1"], "--global-batch 3"),
])
def test_cli_refuses_bad_input_in_one_line(argv, named):
    from attnres_train.plan.cli import main

    with pytest.raises(SystemExit) as refused:
        main(argv)
    message = str(refused.value)
    assert message.startswith("error: ") and "\n" not in message and named in message, message


def test_cli_prints_the_ranked_table(capsys, tmp_path):
    from attnres_train.plan.cli import main

    main(["--model", "small", "--seq-len", "512", "--global-batch", "16", "--nodes", "1", "--gpus-per-node", "4",
          "--rows", "3", "--json", str(tmp_path / "plan.json")])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3 and "tokens/s" in table[0]
    written = json.loads((tmp_path / "plan.json").read_text())
    assert len(written) > 3 and all(row["data_parallel"] * row["pipeline_stages"] == 4 for row in written)
