"""Worker launched by ``test_expert_parallel.py`` under torchrun (gloo): several trainer launches in one process
group, one after another, so the interpreter, DeepSpeed and the rendezvous start once.

``python _expert_parallel_trainer_worker.py LAUNCHES_JSON``: a JSON list of launches, each a list of Hydra
overrides of ``configs/train.yaml`` exactly as ``attnres-train`` takes them. Each launch composes its config and
runs ``Trainer(cfg).run()`` as the CLI would. Between launches every rank reseeds its RNGs with a value no launch
uses, so a resumed launch that failed to restore the checkpoint's RNG state (or anything else it must read from
the checkpoint) would not be rescued by state left over from the previous launch in this process. DeepSpeed's
process-group registry (the pipeline grid, the expert groups by degree) is module state too: it is emptied
between launches, as a new process would find it, so a launch with another layout builds its own groups.
"""

from __future__ import annotations

import json
import sys

import torch


def main(launches: list[list[str]]) -> None:
    from hydra import compose, initialize_config_dir

    from attnres_train.train.cli import config_dir
    from attnres_train.train.config import register_schema
    from attnres_train.train.trainer import Trainer

    register_schema()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for number, overrides in enumerate(launches):
            torch.manual_seed(987_654 + number)
            _forget_deepspeed_groups()
            Trainer(compose(config_name="train", overrides=overrides)).run()
            if torch.distributed.is_initialized():
                torch.distributed.barrier()


def _forget_deepspeed_groups() -> None:
    from deepspeed.utils import groups

    groups.mpu = None
    for registry in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                     groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        registry.clear()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
