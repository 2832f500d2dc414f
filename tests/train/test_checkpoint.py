"""Crash-safe checkpointing (attnres_train.train.checkpoint) and RNG capture (attnres_train.train.rng).

The DeepSpeed tests drive one real single-process engine (CPU accelerator, gloo) shared by the module; each
test first saves its own state, so test order does not matter. Tests that corrupt files run last anyway.
"""

import os
from pathlib import Path

# Set before deepspeed is imported: its first init compiles a C++ op, cached here once per machine.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "attnres_train" / "torch_extensions"))

import dataclasses  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from attnres_train.model.config import ModelConfig  # noqa: E402
from attnres_train.train.checkpoint import (  # noqa: E402
    MARKER_NAME,
    POINTER_NAME,
    SUPERSEDED_DIR_NAME,
    CheckpointError,
    CheckpointManager,
    config_fingerprint,
    diff_configs,
    model_config_state,
    tag_for_step,
    validate_fingerprint,
)
from attnres_train.train.rng import capture_rng_state, restore_rng_state  # noqa: E402

MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _no_barrier() -> None:
    pass


def _manager(root, keep_last=0) -> CheckpointManager:
    return CheckpointManager(root, keep_last=keep_last, rank=0, world_size=1, barrier=_no_barrier)


@pytest.fixture(scope="module")
def engine(deepspeed_single_process):
    deepspeed = deepspeed_single_process
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}, "steps_per_print": 2**31 - 1}
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return ds_engine


def _train(engine, num_steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_steps):
        x = torch.randn(2, 4, generator=generator).to(engine.device)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    return {name: param.detach().cpu().clone() for name, param in engine.module.named_parameters()}


def _optimizer_tensors(engine) -> list[torch.Tensor]:
    # ZeRO wraps the AdamW passed in; its state holds the moments of the flat fp32 partitions.
    state = engine.optimizer.optimizer.state_dict()["state"]
    return [value.detach().cpu().clone() for key in sorted(state) for _, value in sorted(state[key].items())
            if torch.is_tensor(value)]


def _assert_same_tensors(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert torch.equal(got, want)


# --- no DeepSpeed needed ---------------------------------------------------------------------------------------


def _draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 10**6, (2,)).tolist()


def test_rng_restore_reproduces_python_numpy_torch_draws():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()  # move away from the seeded state, so the restore is not a re-seed by accident
    buffer = io.BytesIO()
    torch.save(capture_rng_state(), buffer)  # must survive the trip through a checkpoint file
    first = _draws()
    assert _draws() != first  # the generators do advance, so equality below means the state was restored
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=False))
    assert _draws() == first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_restore_reproduces_cuda_draws():
    torch.cuda.manual_seed_all(5)
    state = capture_rng_state()
    assert len(state["torch_cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda").tolist()
    assert torch.rand(4, device="cuda").tolist() != first
    restore_rng_state(state)
    assert torch.rand(4, device="cuda").tolist() == first


def test_rng_restore_rejects_incomplete_state():
    state = capture_rng_state()
    del state["numpy"]
    with pytest.raises(ValueError, match="numpy"):
        restore_rng_state(state)


def test_fingerprint_is_order_independent_and_diff_names_fields():
    config = dataclasses.asdict(ModelConfig())
    reordered = dict(reversed(list(config.items())))
    assert config_fingerprint(config) == config_fingerprint(reordered)
    assert config_fingerprint({"dims": (1, 2)}) == config_fingerprint({"dims": [1, 2]})
    changed = {**config, "hidden_size": config["hidden_size"] * 2}
    assert config_fingerprint(changed) != config_fingerprint(config)
    assert diff_configs(config, changed) == [
        f"hidden_size: saved {config['hidden_size']}, current {config['hidden_size'] * 2}"]
    assert diff_configs({"a": 1, "nested": {"b": 2}}, {"nested": {"b": 3}, "c": 1.0}) == [
        "a: saved 1, current '<missing>'", "c: saved '<missing>', current 1.0", "nested.b: saved 2, current 3"]
    with pytest.raises(TypeError, match="'nested.bad'"):
        config_fingerprint({"nested": {"bad": object()}})


def test_fingerprint_mismatch_raises_naming_differing_fields():
    saved_config = dataclasses.asdict(ModelConfig())
    client_state = {**model_config_state(saved_config), "step": 7}
    validate_fingerprint(client_state, config_fingerprint(saved_config), saved_config)  # same config: no error
    current = {**saved_config, "num_layers": saved_config["num_layers"] + 1, "linear_mixer": "gdn"}
    with pytest.raises(CheckpointError) as excinfo:
        validate_fingerprint(client_state, config_fingerprint(current), current)
    message = str(excinfo.value)
    assert f"num_layers: saved {saved_config['num_layers']}, current {saved_config['num_layers'] + 1}" in message
    assert "linear_mixer: saved 'kda', current 'gdn'" in message
    assert "hidden_size" not in message
    with pytest.raises(CheckpointError, match="model_config_fingerprint"):
        validate_fingerprint({"step": 7}, config_fingerprint(current), current)


def test_manager_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=-1, rank=0, world_size=1, barrier=_no_barrier)
    with pytest.raises(ValueError, match="rank"):
        CheckpointManager(tmp_path, keep_last=1, rank=2, world_size=2, barrier=_no_barrier)
    with pytest.raises(ValueError, match="step"):
        tag_for_step(-1)


class _ShardWritingEngine:
    """Stands in for one rank of a DeepSpeed engine: writes one shard file per rank into the tag directory."""

    def __init__(self, rank: int):
        self.rank = rank

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        tag_dir = Path(save_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        (tag_dir / f"shard_{self.rank}.bin").write_bytes(bytes(10 + self.rank))


def test_two_ranks_follow_the_same_barrier_sequence(tmp_path):
    # Real threads with a real barrier: a rank that skipped or added a barrier would break it (BrokenBarrierError).
    world_size = 2
    thread_barrier = threading.Barrier(world_size, timeout=20)
    errors = []

    shared: list = [None] * world_size

    def all_gather(rank, obj):  # what all_gather_object does across processes, across threads
        thread_barrier.wait()
        shared[rank] = obj
        thread_barrier.wait()
        gathered = list(shared)
        thread_barrier.wait()
        return gathered

    def run_rank(rank):
        try:
            manager = CheckpointManager(tmp_path, keep_last=1, rank=rank, world_size=world_size,
                                        barrier=thread_barrier.wait, all_gather=lambda obj: all_gather(rank, obj))
            engine = _ShardWritingEngine(rank)
            manager.save(engine, 5, {"step": 5}, rank_state={"rank": rank})
            manager.save(engine, 5, {"step": 5})  # same state again: skipped on both ranks
            manager.save(engine, 6, {"step": 6}, rank_state={"rank": rank})
            assert manager.load_rank_state(tag_for_step(6)) == {"rank": rank}
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)
            thread_barrier.abort()

    threads = [threading.Thread(target=run_rank, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    marker = json.loads((tmp_path / tag_for_step(6) / MARKER_NAME).read_text())
    assert marker["world_size"] == 2
    assert marker["files"] == {"shard_0.bin": 10, "shard_1.bin": 11,
                               "rank_state_00000.pt": (tmp_path / "step_00000006/rank_state_00000.pt").stat().st_size,
                               "rank_state_00001.pt": (tmp_path / "step_00000006/rank_state_00001.pt").stat().st_size}
    assert not (tmp_path / tag_for_step(5)).exists()  # keep_last=1
    assert (tmp_path / POINTER_NAME).read_text().strip() == tag_for_step(6)


# --- with a real DeepSpeed engine ------------------------------------------------------------------------------


def test_round_trip_restores_weights_optimizer_and_client_state(engine, tmp_path):
    manager = _manager(tmp_path, keep_last=3)
    _train(engine, 2, seed=0)
    model_config = dataclasses.asdict(ModelConfig())
    # "module" and "optimizer" are DeepSpeed's own keys in its states file: they must not clobber its data.
    client_state = {"data_position": 1234, "module": "caller's value", "optimizer": [1, 2],
                    **model_config_state(model_config)}
    tag_dir = manager.save(engine, 2, client_state)
    weights, moments, global_steps = _weights(engine), _optimizer_tensors(engine), engine.global_steps

    _train(engine, 3, seed=1)
    continued = _weights(engine)
    assert not torch.equal(continued["0.weight"], weights["0.weight"])  # training moved on, so the load matters

    loaded = manager.load(engine)
    assert loaded == client_state
    assert manager.loaded_tag == tag_dir.name == "step_00000002"
    _assert_same_tensors(list(_weights(engine).values()), list(weights.values()))
    _assert_same_tensors(_optimizer_tensors(engine), moments)
    assert engine.global_steps == global_steps
    # Same data after the restore must give bit-identical weights: Adam moments and step counts came back too.
    _train(engine, 3, seed=1)
    _assert_same_tensors(list(_weights(engine).values()), list(continued.values()))

    marker = json.loads((tag_dir / MARKER_NAME).read_text())
    assert marker["step"] == 2 and marker["world_size"] == 1
    assert marker["config_fingerprint"] == config_fingerprint(model_config)
    assert set(marker["files"]) == {MODEL_FILE, OPTIM_FILE}
    assert (tmp_path / POINTER_NAME).read_text().strip() == "step_00000002"
    validate_fingerprint(loaded, config_fingerprint(model_config), model_config)


def test_rank_state_round_trip_restores_rng(engine, tmp_path):
    manager = _manager(tmp_path)
    torch.manual_seed(11)
    manager.save(engine, 1, {}, rank_state={"rng": capture_rng_state()})
    expected = _draws()
    _draws()
    assert manager.load(engine) == {}
    restore_rng_state(manager.load_rank_state()["rng"])
    assert _draws() == expected


def test_keep_last_prunes_old_and_incomplete_checkpoints(engine, tmp_path):
    manager = _manager(tmp_path, keep_last=2)
    (tmp_path / "step_00000000").mkdir(parents=True)  # leftover of a crashed save: no marker
    (tmp_path / "step_00000000" / MODEL_FILE).write_bytes(b"partial")
    for step in (1, 2, 3, 4):
        manager.save(engine, step, {"step": step})
    assert manager.complete_tags() == ["step_00000003", "step_00000004"]
    assert sorted(path.name for path in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert manager.load(engine) == {"step": 4}


def test_crash_during_save_keeps_previous_checkpoint_loadable(engine, tmp_path, monkeypatch):
    manager = _manager(tmp_path)
    manager.save(engine, 10, {"step": 10})
    real_save = engine.checkpoint_engine.save
    calls = []

    def save_then_die(state_dict, path):
        calls.append(path)
        if len(calls) == 2:  # the model states file is on disk, the optimizer shard is not
            raise OSError("simulated crash: disk full")
        real_save(state_dict, path)

    monkeypatch.setattr(engine.checkpoint_engine, "save", save_then_die)
    with pytest.raises(CheckpointError, match="step_00000020.*step_00000010") as excinfo:
        manager.save(engine, 20, {"step": 20})
    assert isinstance(excinfo.value.__cause__, OSError)
    partial_dir = tmp_path / "step_00000020"
    assert not partial_dir.exists()  # a failed save removes what it wrote
    # A save killed outright (no exception to clean up after) leaves a partial directory: never loaded.
    partial_dir.mkdir()
    (partial_dir / MODEL_FILE).write_bytes((tmp_path / "step_00000010" / MODEL_FILE).read_bytes())
    assert manager.latest() == ("step_00000010", tmp_path / "step_00000010")
    assert (tmp_path / POINTER_NAME).read_text().strip() == "step_00000010"
    with pytest.raises(CheckpointError, match="step_00000020 is incomplete"):
        manager.load(engine, tag="step_00000020")
    assert manager.load(engine) == {"step": 10}

    monkeypatch.undo()  # the "restarted" run saves the same step again over the partial directory
    manager.save(engine, 20, {"step": 20})
    assert manager.latest()[0] == "step_00000020"
    assert manager.load(engine) == {"step": 20}


def test_pointer_missing_or_corrupt_falls_back_to_scan(engine, tmp_path):
    manager = _manager(tmp_path)
    manager.save(engine, 5, {"step": 5})
    manager.save(engine, 7, {"step": 7})
    pointer = tmp_path / POINTER_NAME
    (tmp_path / "step_00000009").mkdir()  # incomplete, newer: never chosen
    pointer.unlink()
    assert manager.latest()[0] == "step_00000007"
    assert manager.load(engine) == {"step": 7}
    for pointer_bytes in (b"\xff\xfe\x00garbage", b"step_00000099\n", b"step_00000009\n", b""):
        pointer.write_bytes(pointer_bytes)
        assert manager.latest()[0] == "step_00000007", pointer_bytes
    pointer.write_text("step_00000005\n")  # a valid pointer is trusted even though a higher step exists
    assert manager.latest()[0] == "step_00000005"
    pointer.unlink()
    (tmp_path / "step_00000007" / MARKER_NAME).write_text("{not json")
    assert manager.latest()[0] == "step_00000005"
    assert manager.load(engine) == {"step": 5}


def test_resave_same_step_is_skipped_and_other_trajectories_are_moved_aside(engine, tmp_path):
    manager = _manager(tmp_path)
    for step in (2, 4, 6):
        manager.save(engine, step, {"step": step})
    model_file = tmp_path / "step_00000006" / MODEL_FILE
    written_at = model_file.stat().st_mtime_ns
    assert manager.save(engine, 6, {"step": 6}) == tmp_path / "step_00000006"  # final save == periodic save
    assert model_file.stat().st_mtime_ns == written_at

    # The run goes back to an earlier tag (a rewind after a loss spike). step_4 was written by this manager,
    # but it is no longer the trajectory in memory, so the save must not be skipped.
    assert manager.load(engine, tag="step_00000002") == {"step": 2}
    manager.save(engine, 4, {"step": 4, "branch": "rewound"})
    assert manager.complete_tags() == ["step_00000002", "step_00000004"]
    assert manager.latest()[0] == "step_00000004"
    assert manager.load(engine) == {"step": 4, "branch": "rewound"}
    moved = sorted(path.name.split(".")[0] for path in (tmp_path / SUPERSEDED_DIR_NAME).iterdir())
    assert moved == ["step_00000004", "step_00000006"]  # kept, not deleted


def test_truncated_or_missing_file_raises_checkpoint_error_naming_it(engine, tmp_path):
    manager = _manager(tmp_path)
    manager.save(engine, 3, {"step": 3})
    tag_dir = manager.save(engine, 4, {"step": 4})
    model_path = tag_dir / MODEL_FILE
    original = model_path.read_bytes()
    model_path.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError) as excinfo:
        manager.load(engine)
    assert str(model_path) in str(excinfo.value) and "damaged" in str(excinfo.value)

    model_path.unlink()
    with pytest.raises(CheckpointError, match=f"{model_path} is missing"):
        manager.load(engine)
    model_path.write_bytes(original)
    assert manager.load(engine) == {"step": 4}


def test_corrupt_file_of_same_size_raises_checkpoint_error_with_cause(engine, tmp_path):
    manager = _manager(tmp_path)
    manager.save(engine, 3, {"step": 3})
    optim_path = manager.save(engine, 4, {"step": 4}) / OPTIM_FILE
    optim_path.write_bytes(b"\x01" * optim_path.stat().st_size)  # size check passes, content is garbage
    with pytest.raises(CheckpointError) as excinfo:
        manager.load(engine)
    message = str(excinfo.value)
    assert str(optim_path) in message and "step_00000003" in message  # names the file and the alternative
    assert "differs from the SHA-256" in message  # caught by its hash, before DeepSpeed reads it
    with pytest.raises(CheckpointError) as excinfo:  # without the hash check DeepSpeed's own failure is named
        manager.load(engine, verify=False)
    assert str(optim_path) in str(excinfo.value) and excinfo.value.__cause__ is not None
    assert manager.load(engine, tag="step_00000003") == {"step": 3}
