"""``attnres-export CHECKPOINT_OR_MODEL OUT_DIR``: a trained model as a Hugging Face directory.

    attnres-export runs/demo/checkpoints/step_00000200 exported/demo

The source is any complete training checkpoint (plain, pipelined or ZeRO-3: the shards are read directly), or an
exported ``.pt`` / Hugging Face directory. ``--format auto`` (default) writes transformers' native Kimi Linear
model for a standard-residual KDA / MLA stack (loads with ``AutoModelForCausalLM.from_pretrained`` and no custom
code) and this package's ``attnres`` model type for everything else (loads the same way after
``import attnres_train``). What a format cannot hold is refused with the reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .kimi_linear import InteropError
from .pretrained import DTYPES, FORMATS, read_model_source, write_hf_directory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="attnres-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a complete checkpoint (step_XXXXXXXX), .pt file or HF directory")
    parser.add_argument("out_dir", type=Path, help="the directory to write (must not exist, or be empty)")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="target model type (default: auto)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weight dtype (auto: as saved)")
    parser.add_argument("--tokenizer", default=None,
                        help="'byte' or a tokenizer directory, when the source does not name its tokenizer")
    args = parser.parse_args(argv)
    try:
        source = read_model_source(args.source)
        if args.tokenizer is not None:
            source.tokenizer = args.tokenizer
        written = write_hf_directory(source, args.out_dir, args.format, args.dtype)
    except InteropError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    count = sum(value.numel() for value in source.state.values())
    print(f"wrote {args.out_dir} ({written}, {count:,} values)")


if __name__ == "__main__":
    main()
