"""Export a complete training checkpoint as one plain model file, whatever parallelism wrote it.

    python -m attnres_train.train.export RUN_DIR/checkpoints/step_00001000 model.pt

The output holds ``{"model_config": dict, "state_dict": HybridDecoder state dict}``; ``load_exported`` builds the
model from it. Pipeline checkpoints (one ``layer_XX-model_states.pt`` per pipeline layer) are mapped back to the
decoder's parameter names, so a model trained with P stages runs or fine-tunes anywhere, including a laptop CPU.
Under ZeRO-3 the module files hold empty placeholders: the parameters are gathered from every data-parallel rank's
fp32 partition (``zero_pp_rank_*_optim_states.pt``), the buffers from the module file.

For a Hugging Face directory (native Kimi Linear or this package's ``attnres`` model type) use
``attnres-export`` (``attnres_train.interop.export``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from attnres_train.model import build_model
from attnres_train.model.config import with_legacy_fields

from attnres_train.atomic_files import atomic_write

from .checkpoint import MARKER_NAME, MODEL_CONFIG_KEY, CheckpointError, no_space_left, read_checkpoint_file

LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt$")
ZERO3_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


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
    model_cfg = with_legacy_fields(model_cfg)
    state = saved_module_state(tag_dir, int(model_cfg["num_layers"]))
    if model_cfg.get("tie_embeddings") and "embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])  # a pipeline stores the tied matrix once
    return model_cfg, state


def saved_module_state(tag_dir: Path, num_layers: int) -> dict:
    """Every parameter and buffer a checkpoint's module files hold, at the precision the module kept them, under
    the plain model's names: a pipeline's ``layer_XX-model_states.pt`` files, or (a pipeline with expert
    parallelism, which DeepSpeed saves as an MoE model) every stage's ``mp_rank_{stage}`` module, else
    ``mp_rank_00``'s module. The files are memory-mapped: tensors are read when touched."""
    tag_dir = Path(tag_dir)
    layer_files = sorted(
        (int(m.group(1)), p) for p in tag_dir.iterdir() if (m := LAYER_FILE.search(p.name)) is not None
    )
    if layer_files:
        from attnres_train.parallel.pipeline import model_key

        return {model_key(index, key, num_layers): value
                for index, path in layer_files for key, value in read_checkpoint_file(path, mmap=True).items()}
    stage_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if len(stage_files) > 1:
        from attnres_train.parallel.pipeline import pipeline_state_dict_to_model

        state: dict = {}
        for path in stage_files:
            state.update(pipeline_state_dict_to_model(read_checkpoint_file(path, mmap=True).get("module") or {},
                                                      num_layers))
        return _with_all_experts(tag_dir, state)
    zero3_files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    if zero3_files:
        return zero3_module_state(tag_dir, read_checkpoint_file(zero3_files[0], mmap=True))
    path = tag_dir / "mp_rank_00_model_states.pt"
    module = read_checkpoint_file(path, mmap=True).get("module")
    if not module:
        raise CheckpointError(f"{path}: holds no module weights")
    return _with_all_experts(tag_dir, dict(module))


def _with_all_experts(tag_dir: Path, state: dict) -> dict:
    """Expert parallelism: rank 0's module (each stage's, under pipelining) holds only its expert slice; the
    expert shard files hold them all."""
    from attnres_train.parallel.expert_parallel import merge_expert_shards

    try:
        return merge_expert_shards(tag_dir, state, lambda shard: read_checkpoint_file(shard, mmap=True))
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc)) from exc


def zero3_module_state(tag_dir: Path, model_states: dict) -> dict:
    """Whole parameters of a ZeRO-3 checkpoint. Each rank's fp32 partition is its parameters' slices laid end to
    end: parameter p (in ``param_shapes`` order) takes ``ceil(numel / ranks)`` elements on every rank, and rank r
    holds elements ``[r * that, (r + 1) * that)`` of the flattened parameter (the last rank zero-padded)."""
    optim_files = {int(m.group(1)): p for p in tag_dir.iterdir()
                   if (m := ZERO3_OPTIM_FILE.search(p.name)) is not None}
    if not optim_files:
        raise CheckpointError(f"{tag_dir}: ZeRO-3 module files but no zero_pp_rank_*_optim_states.pt with the weights")
    flats = []
    for rank in range(len(optim_files)):
        if rank not in optim_files:
            raise CheckpointError(f"{tag_dir}: zero_pp_rank_{rank}_mp_rank_00_optim_states.pt is missing")
        state = read_checkpoint_file(optim_files[rank], mmap=True).get("optimizer_state_dict") or {}
        if "fp32_flat_groups" not in state:
            raise CheckpointError(f"{optim_files[rank]}: not a ZeRO-3 optimizer file (no fp32_flat_groups)")
        if int(state.get("partition_count", len(optim_files))) != len(optim_files):
            raise CheckpointError(f"{tag_dir}: saved by {state['partition_count']} ranks but "
                                  f"{len(optim_files)} optimizer files are present")
        flats.append(torch.cat([group.reshape(-1) for group in state["fp32_flat_groups"]]))
    ranks = len(flats)
    out, offset = {}, 0
    for group in model_states["param_shapes"]:
        for name, shape in group.items():
            numel = torch.Size(shape).numel()
            per_rank = -(-numel // ranks)
            if offset + per_rank > flats[0].numel():
                raise CheckpointError(f"{tag_dir}: the fp32 partitions end before parameter {name}")
            pieces = [flat[offset:offset + per_rank] for flat in flats]
            out[name] = torch.cat(pieces)[:numel].view(shape).clone()
            offset += per_rank
    buffers = set(model_states.get("buffer_names") or ())
    out.update({name: value for name, value in model_states["module"].items() if name in buffers})
    for name, source in (model_states.get("shared_params") or {}).items():
        out[name] = out[source]
    return out


def load_exported(path: Path, device: str | torch.device = "cpu"):
    """The model of a file ``main`` wrote, read (weights only) and checked against its config by the one reader of
    every exported format, ``attnres_train.interop.pretrained``."""
    from attnres_train.interop.pretrained import build_pretrained_model, read_model_source

    return build_pretrained_model(read_model_source(path), device)


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
    if not args.output.parent.is_dir():
        print(f"error: {args.output}: the directory {args.output.parent} does not exist", file=sys.stderr)
        raise SystemExit(2)
    try:
        atomic_write(args.output, lambda handle: torch.save({"model_config": model_cfg, "state_dict": state}, handle))
    except OSError as error:
        reason = no_space_left(error, args.output.parent) or f"{error.strerror or error}"
        print(f"error: writing {args.output} failed: {reason}; nothing was left behind", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {args.output}: {sum(v.numel() for v in state.values() if torch.is_tensor(v)):,} values")


if __name__ == "__main__":
    main()
