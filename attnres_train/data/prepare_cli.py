"""``attnres-prepare``: tokenize a source once into a prepared dataset directory.

Takes the trainer's ``data`` group and overrides (``data=hf data.hf_data_files=a.jsonl``) plus ``out_dir``,
``workers``, ``shard_mb`` and ``progress`` (``configs/prepare.yaml``). Errors in the config or the data are one
line on stderr and exit status 2; nothing is written for them.
"""

from __future__ import annotations

import sys
from typing import Optional

USAGE = """usage: attnres-prepare [data=<stdlib|hf>] [data.<field>=<value> ...] out_dir=DIR [workers=N] [shard_mb=MB]
                       [progress=true|false]

Tokenizes the documents of the data group once into DIR: token shards, a document index and manifest.json.
Train from it with: attnres-train data=prepared data.path=DIR (data.tokenizer as here).
Killed and run again with the same arguments, it continues where it stopped.
"""


def main(argv: Optional[list[str]] = None) -> int:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from attnres_train.train.cli import config_dir

    from .config import DataConfigError
    from .prepare import prepare_dataset

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    try:
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException

        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="attnres-prepare"):
            cfg = compose(config_name="prepare", overrides=args)
        if OmegaConf.is_missing(cfg, "out_dir"):
            raise DataConfigError("out_dir: required (the directory to write the prepared dataset into)")
        shard_mb = cfg.shard_mb
        if isinstance(shard_mb, bool) or not isinstance(shard_mb, (int, float)) or shard_mb <= 0:
            raise DataConfigError(f"shard_mb={shard_mb!r}: expected a positive number of megabytes")
        manifest = prepare_dataset(cfg.data, cfg.out_dir, num_workers=cfg.workers,
                                   shard_text_bytes=int(shard_mb * 2**20), progress=bool(cfg.progress))
    except (DataConfigError, HydraException, OmegaConfBaseException) as exc:
        print(f"error: {exc}".splitlines()[0] if isinstance(exc, DataConfigError) else f"error: {exc}",
              file=sys.stderr, flush=True)
        return 2
    train = manifest["parts"]["train"]
    print(f"{cfg.out_dir}: {train['num_documents']:,} train documents, {train['num_tokens']:,} tokens "
          f"({manifest['token_dtype']})", flush=True)
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
