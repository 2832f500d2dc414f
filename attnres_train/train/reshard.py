"""Resume a checkpoint under another parallel layout: a different pipeline stage count (1 included), ZeRO stage
(0, 1 or 2) or precision than the run that saved it.

DeepSpeed loads a checkpoint only into the layout that wrote it: its optimizer files hold flat, per-rank
partitions whose offsets depend on the stage split, the data-parallel degree and the precision wrapper. Here each
parameter's fp32 master weight and optimizer state is read back by *name* from whatever the saving layout wrote,
translated to the plain model's names (``layers.3.mixer.q_proj.weight``), and written into the new engine's own
partitions. The result equals the saved training state exactly (fp32 values, Adam moments, step counts, the LR
schedule), so a run continues as if it had never changed layout.

Saved layouts it reads (one DeepSpeed 0.19 checkpoint tag):

* flat partitions (ZeRO-1/2, and DeepSpeed's BF16 optimizer): ``*zero_pp_rank_{dp}_mp_rank_{stage}_optim_states.pt``,
  cut by the ``param_slice_mappings`` DeepSpeed stores beside them;
* an unpartitioned optimizer in ``mp_rank_{stage}_model_states.pt`` (ZeRO-0: a torch optimizer, or DeepSpeed's
  fp32 copies for bf16), matched to names through the ``optimizer_param_names`` the trainer records.

Each rank reads only its own parameters; the files are memory-mapped, so a rank touches the bytes it needs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from .checkpoint import CLIENT_STATE_KEY, CheckpointError

logger = logging.getLogger(__name__)

OPTIMIZER_NAMES_KEY = "optimizer_param_names"
_FLAT_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_LAYER_FILE = re.compile(r"^layer_(\d+)-model_states\.pt$")


@dataclass
class ParameterState:
    """One parameter's full (unpartitioned) training state, in fp32."""

    master: torch.Tensor
    optimizer: dict[str, Any]  # full-shape tensors (exp_avg, momentum_buffer, ...) and scalars (step)


def pipeline_to_model_name(num_layers: int) -> Callable[[str], str]:
    """Name translation for a ``PipelineModule``'s parameters (``"{layer index}.{key}"``, tied modules')."""
    from attnres_train.parallel.pipeline import pipeline_name_to_model

    return lambda name: pipeline_name_to_model(name, num_layers)


def _identity(name: str) -> str:
    return name


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint file {path} could not be read ({type(error).__name__}: {error})") from error


def _as_step(value: Any) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


class SavedTrainingState:
    """The training state of one saved checkpoint tag, addressable by plain-model parameter name."""

    def __init__(self, tag_dir: Path, pipeline_stages: int, num_layers: int) -> None:
        self.tag_dir = Path(tag_dir)
        self.pipeline_stages = pipeline_stages
        self.to_model_name = pipeline_to_model_name(num_layers) if pipeline_stages > 1 else _identity
        self._stage_files = sorted(self.tag_dir.glob("mp_rank_*_model_states.pt"))
        if len(self._stage_files) != pipeline_stages:
            raise CheckpointError(
                f"checkpoint {self.tag_dir}: expected {pipeline_stages} mp_rank_*_model_states.pt file(s) for "
                f"pipeline_stages={pipeline_stages}, found {len(self._stage_files)}")
        self._stage_states = [_load(path) for path in self._stage_files]
        flat: dict[int, dict[int, Path]] = {}
        for path in self.tag_dir.iterdir():
            match = _FLAT_FILE.match(path.name)
            if match:
                flat.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
        self._flat_files = {stage: [ranks[r] for r in sorted(ranks)] for stage, ranks in flat.items()}
        self._module_state: Optional[dict[str, torch.Tensor]] = None

    # --- what every layout stores alike ------------------------------------------------------------------------

    @property
    def client_state(self) -> dict:
        state = self._stage_states[0].get(CLIENT_STATE_KEY)
        if state is None:
            raise CheckpointError(f"checkpoint {self._stage_files[0]} has no '{CLIENT_STATE_KEY}' entry")
        return state

    @property
    def lr_scheduler_state(self) -> Optional[dict]:
        return self._stage_states[0].get("lr_scheduler")

    @property
    def engine_counters(self) -> dict[str, int]:
        state = self._stage_states[0]
        return {key: int(state.get(key) or 0) for key in ("global_steps", "global_samples", "skipped_steps")}

    def module_state(self) -> dict[str, torch.Tensor]:
        """Every saved parameter and buffer at the precision the module held it, under plain-model names."""
        if self._module_state is None:
            self._module_state = self._read_module_state()
        return self._module_state

    def _read_module_state(self) -> dict[str, torch.Tensor]:
        if self.pipeline_stages > 1:
            out = {}
            for path in sorted(self.tag_dir.glob("layer_*-model_states.pt")):
                index = int(_LAYER_FILE.match(path.name).group(1))
                for key, value in _load(path).items():
                    out[self.to_model_name(f"{index}.{key}")] = value
            return out
        module = self._stage_states[0].get("module")
        if not isinstance(module, Mapping):
            raise CheckpointError(f"checkpoint {self._stage_files[0]} holds no module weights")
        return dict(module)

    # --- optimizer state ---------------------------------------------------------------------------------------

    def parameter_states(self, wanted: Iterable[str]) -> dict[str, ParameterState]:
        """Full fp32 master weight and optimizer state of each wanted parameter (plain-model names)."""
        wanted = set(wanted)
        found: dict[str, ParameterState] = {}
        for stage, stage_state in enumerate(self._stage_states):
            if stage in self._flat_files:
                found.update(self._from_flat_partitions(stage, wanted))
            else:
                found.update(self._from_unpartitioned(stage, stage_state, wanted))
        missing = sorted(wanted - found.keys())
        if missing:
            raise CheckpointError(
                f"checkpoint {self.tag_dir} holds no optimizer state for {len(missing)} parameter(s) of this model, "
                f"e.g. {missing[:3]}")
        return found

    def _from_flat_partitions(self, stage: int, wanted: set[str]) -> dict[str, ParameterState]:
        fragments: dict[str, dict[str, list[torch.Tensor]]] = {}
        steps: dict[str, float] = {}
        shapes: dict[str, torch.Size] = {}
        for shape_group in self._stage_states[stage].get("param_shapes") or []:
            for name, shape in shape_group.items():
                shapes[self.to_model_name(name)] = torch.Size(shape)
        for path in self._flat_files[stage]:  # data-parallel rank order: fragments concatenate in this order
            state = _load(path).get("optimizer_state_dict", {})
            mappings = state.get("param_slice_mappings")
            if mappings is None:
                raise CheckpointError(
                    f"checkpoint file {path} has no param_slice_mappings (written by a DeepSpeed older than this "
                    f"reader supports); resume it with the layout that saved it")
            base = state["base_optimizer_state"]
            for group, mapping in enumerate(mappings):
                flat_master = state["single_partition_of_fp32_groups"][group]
                group_state = base["state"].get(group, {})
                for saved_name, address in mapping.items():
                    name = self.to_model_name(saved_name)
                    if name not in wanted:
                        continue
                    pieces = fragments.setdefault(name, {})
                    pieces.setdefault("master", []).append(flat_master.narrow(0, address.start, address.numel))
                    for key, value in group_state.items():
                        # DeepSpeed saves the fp32 partition without the group's end padding, the moments with it.
                        if torch.is_tensor(value) and value.dim() == 1 and value.numel() >= flat_master.numel():
                            pieces.setdefault(key, []).append(value.narrow(0, address.start, address.numel))
                        elif key == "step":
                            steps[name] = _as_step(value)
        out = {}
        for name, pieces in fragments.items():
            if name not in shapes:
                raise CheckpointError(f"checkpoint {self._stage_files[stage]}: no recorded shape for {name}")
            if sum(part.numel() for part in pieces["master"]) != shapes[name].numel():
                raise CheckpointError(
                    f"checkpoint {self.tag_dir}: the partitions of stage {stage} hold "
                    f"{sum(part.numel() for part in pieces['master'])} of the {shapes[name].numel()} elements of "
                    f"{name} (an optimizer file is missing)")
            full = {key: torch.cat(parts).float().view(shapes[name]) for key, parts in pieces.items()}
            master = full.pop("master")
            if name in steps:
                full["step"] = steps[name]
            out[name] = ParameterState(master=master, optimizer=full)
        return out

    def _from_unpartitioned(self, stage: int, stage_state: Mapping, wanted: set[str]) -> dict[str, ParameterState]:
        path = self._stage_files[stage]
        optimizer = stage_state.get("optimizer")
        names = (stage_state.get(CLIENT_STATE_KEY) or {}).get(OPTIMIZER_NAMES_KEY)
        if optimizer is None or names is None:
            raise CheckpointError(
                f"checkpoint file {path} holds no optimizer state with recorded parameter names (saved before "
                f"layout changes were supported); resume it with the layout that saved it")
        masters: Optional[list[torch.Tensor]] = None
        if "optimizer_state_dict" in optimizer:  # DeepSpeed's fp32 copies of bf16 parameters (ZeRO-0, bf16)
            masters = [tensor for group in optimizer["fp32_groups"] for tensor in group]
            optimizer = optimizer["optimizer_state_dict"]
        flat_names = [name for group in names for name in group]
        if len(flat_names) != sum(len(group["params"]) for group in optimizer["param_groups"]):
            raise CheckpointError(
                f"checkpoint file {path}: {len(flat_names)} recorded parameter names for an optimizer of "
                f"{sum(len(g['params']) for g in optimizer['param_groups'])} parameters")
        module = None if masters is not None else self.module_state()
        out = {}
        for index, name in enumerate(flat_names):
            if name not in wanted:
                continue
            saved = optimizer["state"].get(index, {})
            state = {key: (value.float() if torch.is_tensor(value) and value.dim() > 0 else _as_step(value))
                     for key, value in saved.items()}
            master = masters[index] if masters is not None else module[name]
            out[name] = ParameterState(master=master.float(), optimizer=state)
        return out


# --- writing into a new engine --------------------------------------------------------------------------------


def _group_of(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> Optional[dict]:
    for group in optimizer.param_groups:
        if any(member is param for member in group["params"]):
            return group
    return None


def _fill_state(target: dict, saved: Mapping[str, Any], like: torch.Tensor, name: str, group: Optional[dict]) -> None:
    wants_momentum = group is not None and group.get("name") == "muon"
    required = "momentum_buffer" if wants_momentum else "exp_avg"
    if saved and required not in saved:
        raise CheckpointError(
            f"saved optimizer state of {name} has {sorted(saved)}, this run's optimizer needs '{required}' "
            f"(resume with the optimizer that saved it)")
    for key, value in saved.items():
        if torch.is_tensor(value):
            target[key] = value.to(device=like.device, dtype=torch.float32).reshape(like.shape).clone()
        else:
            target[key] = torch.tensor(value, dtype=torch.float32)


def _restore_plain(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter],
                   saved: Mapping[str, ParameterState], masters: Optional[Mapping[int, torch.Tensor]] = None) -> None:
    """An unpartitioned torch optimizer; ``masters`` maps a model parameter's id to its fp32 copy, if any."""
    for name, param in params.items():
        target_param = masters[id(param)] if masters is not None else param
        with torch.no_grad():
            target_param.copy_(saved[name].master.to(target_param.dtype))
        state: dict = {}
        _fill_state(state, saved[name].optimizer, target_param, name, _group_of(optimizer, target_param))
        if state:
            optimizer.state[target_param] = state


def _restore_flat(optimizer: Any, params: Mapping[str, nn.Parameter], saved: Mapping[str, ParameterState]) -> None:
    """ZeRO-1/2 or DeepSpeed's BF16 optimizer: each parameter maps to a fragment of a flat fp32 partition."""
    base = optimizer.optimizer
    for name, param in params.items():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # none of this parameter lives in this rank's partition
            continue
        start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        hp_start = mapping.hp_fragment_address.start
        flat_param = base.param_groups[mapping.param_group_index]["params"][0]
        with torch.no_grad():
            mapping.hp_fragment.copy_(saved[name].master.reshape(-1).narrow(0, start, numel))
        state = base.state[flat_param]
        for key, value in saved[name].optimizer.items():
            if torch.is_tensor(value):
                if key not in state:
                    state[key] = torch.zeros_like(flat_param, dtype=torch.float32)
                state[key].narrow(0, hp_start, numel).copy_(value.reshape(-1).narrow(0, start, numel))
            else:
                state[key] = torch.tensor(value, dtype=torch.float32)
    # DeepSpeed links these views after its first step; its accessors (safe_get_full_optimizer_state) need them.
    for param in params.values():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            flat_param = base.param_groups[mapping.param_group_index]["params"][0]
            mapping.set_optim_state_fragment(flat_param, base.state[flat_param])


def restore_engine(engine: Any, saved: SavedTrainingState, to_model_name: Callable[[str], str]) -> dict:
    """Write ``saved`` into ``engine`` (weights, buffers, optimizer, LR schedule, step counters); returns the
    client state. ``to_model_name`` translates the engine module's parameter names to plain-model names."""
    module = engine.module
    params = {to_model_name(name): param for name, param in module.named_parameters() if param.requires_grad}
    states = saved.parameter_states(params)
    for name, param in params.items():
        if states[name].master.shape != param.shape:
            raise CheckpointError(
                f"checkpoint {saved.tag_dir}: {name} has shape {tuple(states[name].master.shape)}, this model "
                f"{tuple(param.shape)}")
    module_state = saved.module_state()
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(states[name].master.to(param.dtype))
        for name, buffer in module.named_buffers():
            model_name = to_model_name(name)
            if model_name in module_state:
                buffer.copy_(module_state[model_name].to(buffer.dtype))

    optimizer = engine.optimizer
    if any(getattr(param, "_hp_mapping", None) is not None for param in params.values()):
        _restore_flat(optimizer, params, states)
    elif hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):
        masters = {id(low): high for lows, highs in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                   for low, high in zip(lows, highs)}
        _restore_plain(optimizer.optimizer, params, states, masters)
    elif isinstance(optimizer, torch.optim.Optimizer):
        _restore_plain(optimizer, params, states)
    else:
        raise CheckpointError(
            f"cannot write optimizer state into a {type(optimizer).__name__} (supported: torch optimizers under "
            f"ZeRO-0, ZeRO-1/2 partitions, DeepSpeed's bf16 optimizers)")

    scheduler = engine.lr_scheduler
    if scheduler is not None and saved.lr_scheduler_state is not None:
        scheduler.load_state_dict(saved.lr_scheduler_state)
        # A fresh engine's groups still hold the initial LR; the next step must use the schedule's value.
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    for key, value in saved.engine_counters.items():
        setattr(engine, key, value)
    return saved.client_state
