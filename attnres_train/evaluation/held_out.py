"""``attnres-eval CHECKPOINT_OR_DIR``: loss and bits per byte of a trained model on held-out data.

    attnres-eval runs/demo/checkpoints/step_00000200                       # the stdlib corpus' validation split
    attnres-eval exported/demo --data source=prepared --data path=data/web --batches 32

The model comes from any path ``attnres_train.generate.load_for_generation`` loads (run directory, checkpoint,
Hugging Face directory written by attnres-export, .pt). The data is
the ``data`` config group (``--data KEY=VALUE`` overrides on the defaults; the tokenizer is always the model's), so
every source the trainer validates on works: the stdlib corpus, prepared datasets and their mixtures (scored per
source), Hugging Face datasets. The validation windows are the trainer's (``build_val_loader``), so the numbers
equal a run's ``val_loss`` on the same data.

Bits per byte: total next-token loss in bits over the UTF-8 bytes of the target tokens, each token's bytes
counted as it decodes on its own (exact for the byte tokenizer and byte-level BPE; EOS counts no bytes).
Output: one JSON line per source, ``{"source", "tokens", "bytes", "loss", "bits_per_byte"}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from attnres_train.model.loss import IGNORE_INDEX


def token_byte_lengths(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """UTF-8 length of every token id decoded alone ([vocab_size]); 0 for special tokens and unused ids."""
    from attnres_train.data.tokenizer import ByteTokenizer

    lengths = torch.zeros(vocab_size, dtype=torch.float64)
    if isinstance(tokenizer, ByteTokenizer):
        lengths[:256] = 1.0
        return lengths
    special = set(getattr(tokenizer.hf_tokenizer, "all_special_ids", []) or [])
    for token_id in range(min(vocab_size, tokenizer.vocab_size)):
        if token_id not in special:
            lengths[token_id] = len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_loader: Any, byte_lengths: torch.Tensor, device: Any = "cpu") -> list[dict]:
    from attnres_train.train.pipelined import batches_by_source

    totals: dict[str, list[float]] = {}
    model.eval()
    for source, batch in batches_by_source(val_loader):
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        logits = model(input_ids, doc_ids=batch.get("doc_ids", None)).logits
        nats = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        counted = labels[labels != IGNORE_INDEX].cpu()
        total = totals.setdefault(source, [0.0, 0.0, 0.0])
        total[0] += float(nats)
        total[1] += counted.numel()
        total[2] += float(byte_lengths[counted].sum())
    return [{"source": source, "tokens": int(tokens), "bytes": int(num_bytes), "loss": nats / max(tokens, 1),
             "bits_per_byte": nats / math.log(2) / num_bytes if num_bytes else None}
            for source, (nats, tokens, num_bytes) in totals.items()]


def _data_overrides(pairs: Sequence[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--data {pair!r}: expected KEY=VALUE (a field of the data config group)")
        out[key] = yaml.safe_load(value)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="attnres-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path,
                        help="a run directory, complete checkpoint, exported Hugging Face directory or .pt file")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="data config field (repeatable), e.g. source=prepared, path=DIR, seq_len=256")
    parser.add_argument("--batches", type=int, default=8, help="validation batches per source (default 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per batch (default 4)")
    parser.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer directory, if the source has none")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from attnres_train.data import DataConfig, DataConfigError, build_val_loader
    from attnres_train.generate.loading import load_for_generation

    try:
        loaded = load_for_generation(args.source, args.device, args.tokenizer)
        fields = {"seq_len": 512, **_data_overrides(args.data), "tokenizer": loaded.tokenizer_spec}
        val_loader = build_val_loader(DataConfig.from_mapping(fields), loaded.tokenizer,
                                      micro_batch_size=args.batch_size, num_batches=args.batches)
        byte_lengths = token_byte_lengths(loaded.tokenizer, loaded.model.config.vocab_size)
        results = evaluate(loaded.model, val_loader, byte_lengths, args.device)
    except (DataConfigError, ValueError) as exc:  # GenerationError (a bad model path) is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
