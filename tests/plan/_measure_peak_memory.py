"""Worker of ``test_planner.py``: peak memory of real training steps on CPU, for one layout.

``python _measure_peak_memory.py PRESET SEQ_LEN MICRO_BATCH ZERO_STAGE CHECKPOINTING STEPS`` builds the model,
optimizer and DeepSpeed engine as the trainer does (one gloo rank, or data-parallel ranks under torchrun; fp32),
runs STEPS steps on random tokens and prints one JSON line: the largest rise over the ranks of a process's peak
resident memory (VmHWM, reset through ``/proc/self/clear_refs`` after the imports and the process group) over
its resident memory at that point.
Run with ``MALLOC_MMAP_THRESHOLD_`` set low so freed tensors go back to the system instead of glibc's heap.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(preset: str, seq_len: int, micro_batch: int, zero_stage: int, checkpointing: bool, steps: int) -> None:
    import torch
    import yaml

    torch.set_num_threads(1)
    from attnres_train.model import ModelConfig, build_model
    from attnres_train.model.loss import language_model_loss
    from attnres_train.train.activation_checkpointing import apply_activation_checkpointing
    from attnres_train.train.cli import config_dir
    from attnres_train.train.config import ParallelConfig, TrainConfig
    from attnres_train.train.engine import deepspeed_config, initialize_engine, setup_distributed
    from attnres_train.train.optim import OptimConfig, build_optimizer
    from attnres_train.train.schedule import build_lr_scheduler

    # One process (a plain launch) or its ranks under torchrun, set up as the trainer does; fp32 on the CPU.
    world = setup_distributed(ParallelConfig(), TrainConfig(device="cpu")).world_size

    def train_steps(config: ModelConfig) -> None:
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len), generator=generator)
        doc_ids = torch.zeros_like(input_ids)
        labels = input_ids.roll(-1, dims=1)
        torch.manual_seed(0)
        model = build_model(config)
        if checkpointing:
            apply_activation_checkpointing(model)
        optim = OptimConfig(warmup_steps=1, schedule="constant")
        optimizer = build_optimizer(model, optim)
        scheduler = build_lr_scheduler(optimizer, optim, total_steps=steps)
        train = TrainConfig(micro_batch_size=micro_batch, precision="fp32", device="cpu")
        engine = initialize_engine(model, optimizer, scheduler,
                                   deepspeed_config(train, ParallelConfig(zero_stage=zero_stage), 1.0, "fp32", world))
        for _ in range(steps):
            out = engine(input_ids, doc_ids=doc_ids)
            engine.backward(language_model_loss(out.logits, labels) + out.aux_loss)
            engine.step()

    def preset_config(name: str) -> ModelConfig:
        return ModelConfig.from_mapping(yaml.safe_load((config_dir() / "model" / f"{name}.yaml").read_text()))

    # What the first step of any model costs the process once (modules DeepSpeed and torch import lazily, their
    # bytecode, oneDNN's generated kernels) differs between machines and is not the model's memory: a tiny
    # model's steps pay it before the baseline.
    train_steps(preset_config("tiny"))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)

    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    baseline_kib = _status_kib("VmRSS")
    train_steps(preset_config(preset))
    peak_kib = _status_kib("VmHWM")
    rise = torch.tensor([(peak_kib - baseline_kib) * 1024], dtype=torch.float64)
    torch.distributed.all_reduce(rise, op=torch.distributed.ReduceOp.MAX)
    if torch.distributed.get_rank() == 0:
        print(json.dumps({"peak_rise_bytes": int(rise.item()), "ranks": world}), flush=True)


if __name__ == "__main__":
    preset, seq_len, micro_batch, zero_stage, checkpointing, steps = sys.argv[1:7]
    main(preset, int(seq_len), int(micro_batch), int(zero_stage), checkpointing == "1", int(steps))
