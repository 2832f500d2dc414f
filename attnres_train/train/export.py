"""Export a complete training checkpoint as one plain model file, whatever parallelism wrote it.

    python -m attnres_train.train.export RUN_DIR/checkpoints/step_00001000 model.pt

The output holds ``{"model_config": dict, "state_dict": HybridDecoder state dict}``; ``load_exported`` builds the
model from it. Pipeline checkpoints (one ``layer_XX-model_states.pt`` per pipeline layer) are mapped back to the
decoder's parameter names, so a model trained with P stages runs or fine-tunes anywhere, including a laptop CPU.
Under ZeRO-3 the weights are sharded across optimizer files: convert those with DeepSpeed's
``zero_to_fp32.py`` first.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from attnres_train.model import build_model

from .checkpoint import MARKER_NAME, MODEL_CONFIG_KEY, CheckpointError, read_checkpoint_file

LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt$")


def exported_state(tag_dir: Path) -> tuple[dict, dict]:
    """``(model_config, state_dict)`` of a complete checkpoint directory."""
    tag_dir = Path(tag_dir)
    marker_path = tag_dir / MARKER_NAME
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{tag_dir}: not a complete checkpoint (no readable {MARKER_NAME} marker)") from exc
    model_cfg = marker.get(MODEL_CONFIG_KEY)
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{marker_path}: holds no model config to rebuild the model from")
    state = saved_module_state(tag_dir, int(model_cfg["num_layers"]))
    if model_cfg.get("tie_embeddings") and "embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])  # a pipeline stores the tied matrix once
    return model_cfg, state


def saved_module_state(tag_dir: Path, num_layers: int) -> dict:
    """Every parameter and buffer a checkpoint's module files hold, at the precision the module kept them, under
    the plain model's names: a pipeline's ``layer_XX-model_states.pt`` files, else ``mp_rank_00``'s module.
    The files are memory-mapped: tensors are read when touched."""
    tag_dir = Path(tag_dir)
    layer_files = sorted(
        (int(m.group(1)), p) for p in tag_dir.iterdir() if (m := LAYER_FILE.search(p.name)) is not None
    )
    if layer_files:
        from attnres_train.parallel.pipeline import model_key

        return {model_key(index, key, num_layers): value
                for index, path in layer_files for key, value in read_checkpoint_file(path, mmap=True).items()}
    path = tag_dir / "mp_rank_00_model_states.pt"
    module = read_checkpoint_file(path, mmap=True).get("module")
    if not module:
        raise CheckpointError(f"{path}: holds no module weights (a ZeRO-3 checkpoint? use zero_to_fp32.py)")
    from attnres_train.parallel.expert_parallel import merge_expert_shards

    try:  # expert parallelism: rank 0's module holds only its expert slice; the shards hold them all
        return merge_expert_shards(tag_dir, dict(module), lambda shard: read_checkpoint_file(shard, mmap=True))
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc)) from exc


def load_exported(path: Path, device: str | torch.device = "cpu"):
    payload = torch.load(path, map_location=device, weights_only=False)
    model = build_model(payload["model_config"]).to(device)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a complete checkpoint directory (step_XXXXXXXX)")
    parser.add_argument("output", type=Path, help="where to write the model file (.pt)")
    args = parser.parse_args(argv)
    try:
        model_cfg, state = exported_state(args.checkpoint)
        model = build_model(model_cfg, device="meta")
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if missing or unexpected:
        print(f"error: {args.checkpoint}: weights do not match the model config "
              f"(missing {missing[:3]}, unexpected {unexpected[:3]})", file=sys.stderr)
        raise SystemExit(2)
    if args.output.exists():
        print(f"error: {args.output} exists; not overwriting it", file=sys.stderr)
        raise SystemExit(2)
    torch.save({"model_config": model_cfg, "state_dict": state}, args.output)
    print(f"wrote {args.output}: {sum(v.numel() for v in state.values() if torch.is_tensor(v)):,} values")


if __name__ == "__main__":
    main()
