"""Reading and writing trained models outside the training engine: one entry point for every source.

``read_model_source(PATH)`` -> ``ModelSource(model_cfg, state, tokenizer, kind)`` for
  * a complete training checkpoint (``step_*`` with its ``COMPLETE`` marker; plain, pipelined or ZeRO-3);
  * a Hugging Face directory of the native Kimi Linear model (``model_type: kimi_linear``; published checkpoints
    too) or of this package's ``attnres`` model type, as ``attnres-export`` writes them;
  * a file exported by ``python -m attnres_train.train.export`` (``.pt``).
``write_hf_directory`` writes the Hugging Face directories. The tokenizer travels as a spec: ``"byte"`` or a
directory / hub name ``transformers.AutoTokenizer`` loads; a directory records it in ``attnres_tokenizer.json``
when it holds no tokenizer files of its own (the byte tokenizer has none).
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from attnres_train.model import ModelConfig, ModelConfigError, build_model
from attnres_train.model.config import with_legacy_fields

from .kimi_linear import (
    MODEL_TYPE as KIMI_LINEAR,
    InteropError,
    from_kimi_linear_state,
    kimi_linear_config,
    model_config_from_kimi_linear,
    native_refusals,
    to_kimi_linear_state,
)

OWN_MODEL_TYPE = "attnres"  # hf_config.MODEL_TYPE, repeated here so reading a checkpoint never imports transformers
TOKENIZER_RECORD = "attnres_tokenizer.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
FORMATS = ("auto", KIMI_LINEAR, OWN_MODEL_TYPE)
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ModelSource:
    model_cfg: ModelConfig
    state: dict[str, torch.Tensor]  # the decoder's state dict (HybridDecoder names)
    tokenizer: Optional[str]  # "byte", a tokenizer directory or hub name; None: unknown
    kind: str  # checkpoint | kimi_linear | attnres | pt


# --- reading ------------------------------------------------------------------------------------------------------


def read_model_source(path: Path | str) -> ModelSource:
    path = Path(path)
    if path.is_file():
        from attnres_train.train.checkpoint import CheckpointError, load_weights_only

        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; say so before any unpickling
            raise InteropError(f"{path}: not a model export (not a file written by torch.save)")
        try:
            payload = load_weights_only(path)
        except CheckpointError as exc:
            raise InteropError(str(exc)) from None
        except Exception as exc:  # a zip/pickle error of any kind means: not a torch file
            raise InteropError(f"{path}: not a model export (torch.load failed: {type(exc).__name__})") from None
        if not (isinstance(payload, dict) and isinstance(payload.get("model_config"), dict)
                and isinstance(payload.get("state_dict"), dict)):
            raise InteropError(f"{path}: not a model export (expected a file written by attnres_train.train.export "
                               "holding 'model_config' and 'state_dict')")
        cfg = _model_config(with_legacy_fields(payload["model_config"]), path)
        return ModelSource(cfg, _known_tensors(payload["state_dict"], cfg, path), None, "pt")
    if not path.is_dir():
        raise InteropError(f"{path}: no such checkpoint directory, Hugging Face directory or .pt file")
    from attnres_train.train.checkpoint import MARKER_NAME

    if (path / MARKER_NAME).is_file():
        return _read_checkpoint(path)
    if (path / "config.json").is_file():
        return _read_hf_directory(path)
    raise InteropError(f"{path}: neither a complete training checkpoint (no {MARKER_NAME} marker) nor a Hugging Face "
                       "model directory (no config.json)")


def _model_config(fields: dict, where: Path) -> ModelConfig:
    try:
        return ModelConfig.from_mapping(fields)
    except ModelConfigError as exc:
        raise InteropError(f"{where}: {exc}") from None


def _read_checkpoint(tag_dir: Path) -> ModelSource:
    from attnres_train.train.checkpoint import CheckpointError
    from attnres_train.train.export import exported_state

    try:
        fields, state = exported_state(tag_dir)
    except CheckpointError as exc:
        raise InteropError(str(exc)) from None
    cfg = _model_config(fields, tag_dir)
    return ModelSource(cfg, _known_tensors(state, cfg, tag_dir), _run_tokenizer(tag_dir), "checkpoint")


def _known_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, where: Path) -> dict[str, torch.Tensor]:
    """The decoder's tensors of a training-side state dict (which may hold more), shapes checked against ``cfg``."""
    expected = _expected_shapes(cfg)
    state = {name: value for name, value in state.items() if name in expected}
    _check_shapes(state, expected, where)
    return state


def _run_tokenizer(tag_dir: Path) -> Optional[str]:
    """``data.tokenizer`` of the run that wrote ``run_dir/checkpoints/step_*`` (its resolved config)."""
    import yaml

    from attnres_train.train.run_state import RESOLVED_CONFIG_NAME

    resolved = tag_dir.resolve().parent.parent / RESOLVED_CONFIG_NAME
    try:
        tokenizer = (yaml.safe_load(resolved.read_text()).get("data") or {}).get("tokenizer")
    except (OSError, AttributeError, yaml.YAMLError):
        return None
    return tokenizer if isinstance(tokenizer, str) else None


def _read_hf_directory(directory: Path) -> ModelSource:
    try:
        raw = json.loads((directory / "config.json").read_text())
    except ValueError as exc:
        raise InteropError(f"{directory / 'config.json'}: not valid JSON ({exc})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type == OWN_MODEL_TYPE:
        cfg = _model_config(with_legacy_fields(dict(raw.get("attnres") or {})), directory / "config.json")
        tensors = _read_safetensors(directory)
        state = {name[len("model."):]: value for name, value in tensors.items() if name.startswith("model.")}
        if cfg.tie_embeddings and "lm_head.weight" not in state and "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        _check_shapes(state, _expected_shapes(cfg), directory)
        return ModelSource(cfg, state, directory_tokenizer(directory), OWN_MODEL_TYPE)
    if model_type == KIMI_LINEAR:
        from transformers import AutoConfig

        hf_cfg = AutoConfig.from_pretrained(directory, local_files_only=True)
        cfg = _model_config(model_config_from_kimi_linear(hf_cfg, str(directory)), directory / "config.json")
        state = from_kimi_linear_state(_read_safetensors(directory), cfg, _expected_shapes(cfg), str(directory))
        return ModelSource(cfg, state, directory_tokenizer(directory), KIMI_LINEAR)
    raise InteropError(f"{directory}: config.json has model_type={model_type!r}; expected {KIMI_LINEAR!r} (Kimi "
                       f"Linear) or {OWN_MODEL_TYPE!r} (a model exported by attnres-export)")


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InteropError(f"{directory}: no *.safetensors weight files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def _expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    model = build_model(cfg, device="meta")
    return {name: value.shape for name, value in model.state_dict().items()}


def _check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: Path) -> None:
    for name, shape in expected.items():
        if name not in state:
            raise InteropError(f"{where}: tensor {name} is missing")
        if tuple(state[name].shape) != tuple(shape):
            raise InteropError(f"{where}: tensor {name} has shape {tuple(state[name].shape)}, the config gives "
                               f"{tuple(shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise InteropError(f"{where}: tensor {unexpected[0]} is not part of the configured model")


def directory_tokenizer(directory: Path) -> Optional[str]:
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        return str(directory)
    record = directory / TOKENIZER_RECORD
    if record.is_file():
        return json.loads(record.read_text()).get("tokenizer")
    return None


def load_tokenizer(spec: Optional[str], where: Path | str):
    """The tokenizer of a model source; one error naming ``where`` when there is none or it cannot be loaded."""
    from attnres_train.data.config import DataConfigError
    from attnres_train.data.tokenizer import ByteTokenizer, HFTokenizer

    if spec is None:
        raise InteropError(f"{where}: no tokenizer found (no tokenizer files, no {TOKENIZER_RECORD}, no run config "
                           "naming data.tokenizer); pass --tokenizer byte or a tokenizer directory")
    if spec == "byte":
        return ByteTokenizer()
    try:
        return HFTokenizer(spec)
    except DataConfigError as exc:
        raise InteropError(f"{where}: tokenizer {spec!r} cannot be loaded ({exc})") from None


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that decide the function a model computes, as effective values (a field that does not apply to
    this stack, or an implementation choice, is left out), keyed by the config field to set."""
    kinds, mlps = cfg.layer_kinds(), cfg.mlp_kinds()
    out: dict[str, Any] = {name: getattr(cfg, name) for name in (
        "vocab_size", "hidden_size", "num_layers", "norm_eps", "tie_embeddings", "residual")}
    out["layer_pattern"] = "".join(kinds)
    if cfg.residual != "standard":
        out["attnres_block_size"] = cfg.attnres_block_size
    if "L" in kinds:
        out.update({name: getattr(cfg, name) for name in (
            "linear_mixer", "linear_num_heads", "linear_head_dim", "linear_expand_v", "linear_conv_size",
            "linear_allow_neg_eigval")})
        out["linear_num_v_heads"] = cfg.linear_num_v_heads or cfg.linear_num_heads
        if cfg.linear_mixer == "kda":
            out["linear_output_gate_bias"] = cfg.linear_output_gate_bias
    if "F" in kinds:
        out["full_mixer"] = cfg.full_mixer
        prefix = "mla_" if cfg.full_mixer == "mla" else "gqa_"
        out.update({name: value for name, value in cfg.to_dict().items()
                    if name.startswith(prefix) and name != "mla_latent_norm_eps"})
        if cfg.full_mixer == "mla":
            out["mla_latent_norm_eps"] = cfg.latent_norm_eps()
        if cfg.full_mixer == "gqa" or (cfg.mla_use_rope and cfg.mla_qk_rope_head_dim > 0):
            out["rope_theta"] = cfg.rope_theta
    if "moe" in mlps:
        out.update({name: getattr(cfg, name) for name in (
            "num_experts", "top_k", "num_shared_experts", "expert_ffn_dim", "router_score", "routed_scaling_factor")})
        out["first_dense_layers"] = mlps.count("dense")
    if "dense" in mlps:
        key = "ffn_dim" if cfg.mlp == "dense" else "first_dense_ffn_dim"
        out[key] = cfg.ffn_dim if cfg.mlp == "dense" else (cfg.first_dense_ffn_dim or cfg.ffn_dim)
    return out


def initial_weights(path: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``train.init_from``: the weights at ``path`` for a run configured as ``cfg``, once ``cfg`` is known to
    describe the same model (otherwise one error naming every field to change)."""
    source = read_model_source(Path(path).expanduser())
    saved, current = architecture(source.model_cfg), architecture(cfg)
    differences = [f"model.{name}={saved.get(name)!r} (this run: {current.get(name)!r})"
                   for name in sorted(set(saved) | set(current), key=list({**saved, **current}).index)
                   if saved.get(name) != current.get(name)]
    if differences:
        raise InteropError(f"train.init_from={path!r} holds another model; set " + ", ".join(differences))
    return source.state


# --- writing ------------------------------------------------------------------------------------------------------


def choose_format(cfg: ModelConfig, requested: str) -> str:
    """``auto``: the native Kimi Linear model for a standard-residual stack of KDA / MLA layers, else our own."""
    if requested != "auto":
        return requested
    kinds = set(cfg.layer_kinds())
    kimi_shaped = (cfg.residual == "standard" and ("L" not in kinds or cfg.linear_mixer == "kda")
                   and ("F" not in kinds or cfg.full_mixer == "mla"))
    return KIMI_LINEAR if kimi_shaped else OWN_MODEL_TYPE


def write_hf_directory(source: ModelSource, out_dir: Path, fmt: str = "auto", dtype: str = "auto") -> str:
    """Write ``source`` as a Hugging Face directory; returns the format written. Refuses (InteropError) what the
    format cannot hold, and an ``out_dir`` that exists and is not empty. Written beside, then renamed into place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InteropError(f"{out_dir} exists and is not an empty directory; not overwriting it")
    cfg = source.model_cfg
    fmt = choose_format(cfg, fmt)
    if fmt == KIMI_LINEAR:
        reasons = native_refusals(cfg, source.state)
        if reasons:
            raise InteropError("cannot be written as transformers' native Kimi Linear model: " + "; ".join(reasons)
                               + f" (--format {OWN_MODEL_TYPE} writes this package's own model type)")
    tokenizer = load_tokenizer(source.tokenizer, "the model source")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise InteropError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")
    special = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.eos_token_id,
               "pad_token_id": getattr(tokenizer, "pad_token_id", None) or tokenizer.eos_token_id}
    hf_tokenizer = getattr(tokenizer, "hf_tokenizer", None)
    if hf_tokenizer is not None:
        if hf_tokenizer.bos_token_id is not None:
            special["bos_token_id"] = hf_tokenizer.bos_token_id
        if hf_tokenizer.pad_token_id is not None:
            special["pad_token_id"] = hf_tokenizer.pad_token_id

    state = _cast(source.state, DTYPES[dtype])
    written_dtype = next(v.dtype for v in state.values() if v.is_floating_point() and v.dim() > 1)
    if fmt == KIMI_LINEAR:
        config = kimi_linear_config(cfg, special)
        tensors = to_kimi_linear_state(state, cfg)
    else:
        config = {"architectures": ["AttnResForCausalLM"], "model_type": OWN_MODEL_TYPE, "attnres": cfg.to_dict(),
                  "tie_word_embeddings": cfg.tie_embeddings, **special}
        tensors = {f"model.{name}": value.contiguous() for name, value in state.items()
                   if not (cfg.tie_embeddings and name == "lm_head.weight")}
    config["dtype"] = str(written_dtype).removeprefix("torch.")

    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict(tensors, staging, max_shard_size="5GB", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if hf_tokenizer is not None:
            hf_tokenizer.save_pretrained(staging)
        else:
            (staging / TOKENIZER_RECORD).write_text(json.dumps({"tokenizer": source.tokenizer}) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return fmt


def _cast(state: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    # The MoE balancing bias stays fp32 (as the module keeps it): a bias step is below bf16 resolution.
    out = {}
    for name, value in state.items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point() and not name.endswith("expert_bias"):
            value = value.to(dtype)
        out[name] = value
    return out


def build_pretrained_model(source: ModelSource, device: Any = "cpu"):
    """A ``HybridDecoder`` holding ``source``'s weights (strict load)."""
    model = build_model(source.model_cfg, device="meta")
    model.load_state_dict(source.state, strict=True, assign=True)
    for module in model.modules():  # non-persistent buffers are not in any state dict
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)
    return model.to(device)
