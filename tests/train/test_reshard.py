"""Resuming under another ZeRO stage / precision / optimizer layout (attnres_train.train.reshard), in one process.

Each case trains a real single-process DeepSpeed engine (CPU, gloo) in one layout, saves it with the
CheckpointManager as the trainer does, restores it into an engine of another layout, and checks every fp32
master weight, Adam moment, step count and the LR schedule came back exactly. Pipeline names (the other half of a
stage-count change) are covered end to end in tests/parallel/test_pipeline_training.py.
"""

import os
from pathlib import Path

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "attnres_train" / "torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from attnres_train.model import build_model  # noqa: E402
from attnres_train.train.checkpoint import CheckpointError, CheckpointManager  # noqa: E402
from attnres_train.train.optim import OptimConfig, build_optimizer, param_group_names  # noqa: E402
from attnres_train.train.reshard import (  # noqa: E402
    OPTIMIZER_NAMES_KEY,
    SavedTrainingState,
    layout_changes,
    restore_engine,
)
from attnres_train.train.schedule import build_lr_scheduler  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 32


@pytest.fixture(scope="module")
def deepspeed(deepspeed_single_process):
    return deepspeed_single_process


def _optim_cfg(name: str) -> OptimConfig:
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "optim" / f"{name}.yaml").read_text())
    cfg.update(warmup_steps=1, schedule="cosine", lr=3e-3)
    return OptimConfig.from_mapping(cfg)


def _engine(deepspeed, zero_stage: int, precision: str, optimizer: str = "adamw"):
    torch.manual_seed(0)
    model = build_model(yaml.safe_load((REPO_ROOT / "configs" / "model" / "tiny.yaml").read_text()))
    optim_cfg = _optim_cfg(optimizer)
    torch_optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_lr_scheduler(torch_optimizer, optim_cfg, total_steps=10)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch_optimizer, lr_scheduler=scheduler,
                                           config=config)
    return engine, optim_cfg


def _train(engine, steps: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    loss = None
    for _ in range(steps):
        tokens = torch.randint(0, 250, (2, SEQ_LEN + 1), generator=generator)
        logits = engine(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
    return loss.item()


def _full_state(engine, relink: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {"master", optimizer keys...} through DeepSpeed's public accessors (or the plain optimizer).
    ``relink=False`` relies on the engine's own links from its state to the accessors' views."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    masters = {}
    if hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):
        masters = {id(lo): hi for los, his in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                   for lo, hi in zip(los, his)}
        optimizer = optimizer.optimizer
    out = {}
    for name, param in engine.module.named_parameters():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            # DeepSpeed refreshes these views only on some code paths; point them at the live state first.
            if relink:
                flat = optimizer.optimizer.param_groups[mapping.param_group_index]["params"][0]
                mapping.set_optim_state_fragment(flat, optimizer.optimizer.state[flat])
            entry = {"master": safe_get_full_fp32_param(param)}
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = safe_get_full_optimizer_state(param, key)
        else:
            holder = masters.get(id(param), param)
            entry = {"master": holder.detach().float()}
            entry.update({key: value for key, value in optimizer.state[holder].items() if torch.is_tensor(value)
                          and value.dim() > 0})
        out[name] = {key: value.detach().cpu().clone() for key, value in entry.items()}
    return out


def _steps(engine) -> set[float]:
    base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    return {float(state["step"]) for state in base.state.values() if "step" in state}


def _save(engine, optim_cfg, root: Path, step: int):
    manager = CheckpointManager(root, keep_last=0, rank=0, world_size=1, barrier=lambda: None)
    names = param_group_names(engine.module, optim_cfg)
    manager.save(engine, step, {"step": step, OPTIMIZER_NAMES_KEY: names})
    return root / f"step_{step:08d}"


# Every saved layout once, each restored into another layout.
LAYOUT_CHANGES = [
    ((0, "fp32"), (1, "bf16")),
    ((0, "bf16"), (2, "fp32")),
    ((1, "fp32"), (0, "fp32")),
    ((1, "bf16"), (0, "bf16")),
    ((2, "fp32"), (1, "fp32")),
]


@pytest.mark.parametrize("saved_layout,new_layout", LAYOUT_CHANGES, ids=lambda layout: f"zero{layout[0]}-{layout[1]}")
def test_restore_into_another_layout_is_exact(deepspeed, tmp_path, saved_layout, new_layout):
    source, optim_cfg = _engine(deepspeed, *saved_layout)
    _train(source, steps=3, seed=1)
    tag_dir = _save(source, optim_cfg, tmp_path, step=3)
    expected = _full_state(source)

    target, _ = _engine(deepspeed, *new_layout)
    client_state = restore_engine(target, SavedTrainingState(tag_dir, pipeline_stages=1, num_layers=4),
                                  lambda name: name)
    assert client_state["step"] == 3
    restored = _full_state(target, relink=False)  # the restore links DeepSpeed's accessor views itself
    assert restored.keys() == expected.keys()
    for name, entry in expected.items():
        assert restored[name].keys() == entry.keys(), name
        for key, value in entry.items():
            assert torch.equal(restored[name][key], value), (name, key)
    # DeepSpeed's bf16 ZeRO-0 wrapper takes one zero-gradient step at init: its Adam count runs one ahead, and
    # a restore gives each optimizer the count it would have had after the same 3 training steps.
    def init_steps(layout):
        return int(layout == (0, "bf16"))

    assert _steps(source) == {3.0 + init_steps(saved_layout)}
    assert _steps(target) == {3.0 + init_steps(new_layout)}
    assert target.lr_scheduler.get_last_lr() == source.lr_scheduler.get_last_lr()
    assert [g["lr"] for g in target.optimizer.param_groups] == [g["lr"] for g in source.optimizer.param_groups]
    assert target.global_steps == source.global_steps == 3
    for name, param in target.module.named_parameters():  # the working copy is the master at its precision
        torch.testing.assert_close(param.detach().float(), expected[name]["master"].to(param.dtype).float())

    # Both continue identically when the precision is the same (bf16 rounding otherwise differs by design).
    if saved_layout[1] == new_layout[1] == "fp32":
        assert _train(target, steps=1, seed=2) == pytest.approx(_train(source, steps=1, seed=2), rel=1e-6)


def test_muon_state_restores_and_a_different_optimizer_is_refused(deepspeed, tmp_path):
    source, optim_cfg = _engine(deepspeed, 0, "fp32", optimizer="muon")
    _train(source, steps=2, seed=1)
    tag_dir = _save(source, optim_cfg, tmp_path, step=2)
    target, _ = _engine(deepspeed, 0, "bf16", optimizer="muon")
    restore_engine(target, SavedTrainingState(tag_dir, pipeline_stages=1, num_layers=4), lambda name: name)
    expected, restored = _full_state(source), _full_state(target)
    for name, entry in expected.items():
        for key, value in entry.items():
            assert torch.equal(restored[name][key], value), (name, key)
    assert any("momentum_buffer" in entry for entry in restored.values())

    # Muon state cannot become ZeRO-1 AdamW state (no Adam moments for the matrices).
    zero1_adamw, _ = _engine(deepspeed, 1, "fp32", optimizer="adamw")
    with pytest.raises(CheckpointError, match="exp_avg"):
        restore_engine(zero1_adamw, SavedTrainingState(tag_dir, pipeline_stages=1, num_layers=4), lambda name: name)

    adamw, _ = _engine(deepspeed, 1, "fp32", optimizer="adamw")
    _train(adamw, steps=1, seed=1)
    flat_dir = _save(adamw, _optim_cfg("adamw"), tmp_path / "adamw", step=1)
    muon, _ = _engine(deepspeed, 0, "fp32", optimizer="muon")
    with pytest.raises(CheckpointError, match="momentum_buffer"):
        restore_engine(muon, SavedTrainingState(flat_dir, pipeline_stages=1, num_layers=4), lambda name: name)


def test_unnamed_or_incomplete_checkpoints_are_refused_with_the_file(deepspeed, tmp_path):
    source, optim_cfg = _engine(deepspeed, 0, "fp32")
    _train(source, steps=1, seed=1)
    manager = CheckpointManager(tmp_path / "old", keep_last=0, rank=0, world_size=1, barrier=lambda: None)
    manager.save(source, 1, {"step": 1})  # saved before parameter names were recorded
    target, _ = _engine(deepspeed, 1, "fp32")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt.*recorded parameter names"):
        restore_engine(target, SavedTrainingState(tmp_path / "old" / "step_00000001", 1, 4), lambda name: name)

    zero1, zero1_cfg = _engine(deepspeed, 1, "fp32")
    _train(zero1, steps=1, seed=1)
    tag_dir = _save(zero1, zero1_cfg, tmp_path / "z1", step=1)
    with pytest.raises(CheckpointError, match="expected 2 mp_rank"):
        SavedTrainingState(tag_dir, pipeline_stages=2, num_layers=4)


def _marker(**fields):
    base = {"pipeline_stages": 1, "zero_stage": 1, "precision": "fp32", "pipeline_parts": None,
            "optimizer": "adamw", "world_size": 2,
            "files": {"mp_rank_00_model_states.pt": 1, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 1,
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1}}
    return {**base, **fields}


CURRENT = {"pipeline_stages": 1, "pipeline_parts": None, "zero_stage": 1, "precision": "fp32", "data_parallel": 2,
           "optimizer": "adamw"}


def test_layout_changes_name_what_differs_and_refuse_what_cannot_carry_over(tmp_path):
    assert layout_changes(_marker(), CURRENT, tmp_path) == []
    assert layout_changes(_marker(), {**CURRENT, "data_parallel": 1}, tmp_path) == ["data-parallel ranks: 2 -> 1"]
    unsharded = _marker(zero_stage=0, files={"mp_rank_00_model_states.pt": 1})
    assert layout_changes(unsharded, {**CURRENT, "zero_stage": 0, "data_parallel": 1}, tmp_path) == []
    shards = {"zero_pp_rank_0_mp_rank_00_optim_states.pt": 1, "zero_pp_rank_0_mp_rank_01_optim_states.pt": 1}
    piped = _marker(pipeline_stages=2, pipeline_parts=[0, 3, 6], world_size=2, files=shards)
    moved_cut = {**CURRENT, "pipeline_stages": 2, "pipeline_parts": [0, 4, 6], "data_parallel": 1}
    assert layout_changes(piped, moved_cut, tmp_path) == ["pipeline stage cuts: [0, 3, 6] -> [0, 4, 6]"]
    # DeepSpeed cannot read back its own pipelined bf16 optimizer shards: always by name.
    bf16_pipe = {**piped, "zero_stage": 0, "precision": "bf16"}
    same = {**moved_cut, "pipeline_parts": [0, 3, 6], "zero_stage": 0, "precision": "bf16"}
    assert layout_changes(bf16_pipe, same, tmp_path)
    # Fields an older checkpoint did not record count as unchanged.
    assert layout_changes({"pipeline_stages": 1, "files": {}}, CURRENT, tmp_path) == []
    with pytest.raises(CheckpointError, match="optim.name=muon.*optim.name=adamw"):
        layout_changes(_marker(optimizer="muon"), CURRENT, tmp_path)
    with pytest.raises(CheckpointError, match="ZeRO-3"):
        layout_changes(_marker(), {**CURRENT, "zero_stage": 3}, tmp_path)
