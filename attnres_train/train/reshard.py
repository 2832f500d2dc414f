"""Resume a checkpoint under another parallel layout: a different pipeline stage count (1 included) or stage cut,
ZeRO stage (0, 1 or 2), precision or number of data-parallel ranks than the run that saved it.

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

The files are memory-mapped and read one parameter at a time: a rank holds at most one parameter's full fp32
master at once (its working copy is whole under ZeRO-0/1/2) and reads only its own slice of the optimizer state.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from .checkpoint import CLIENT_STATE_KEY, CheckpointError, read_checkpoint_file
from .export import saved_module_state

logger = logging.getLogger(__name__)

OPTIMIZER_NAMES_KEY = "optimizer_param_names"
_EXPERT_WEIGHT_NAMES = ("w_gate", "w_up", "w_down")  # attnres_train.parallel.expert_parallel.EXPERT_WEIGHT_NAMES
_FLAT_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def model_names(num_layers: int, pipeline_stages: int) -> Callable[[str], str]:
    """Translation of a trained module's parameter names to the plain model's: a ``PipelineModule``'s
    (``"{layer index}.{key}"``, tied modules') when pipelined, the names as they are otherwise."""
    if pipeline_stages == 1:
        return lambda name: name
    from attnres_train.parallel.pipeline import pipeline_name_to_model

    return lambda name: pipeline_name_to_model(name, num_layers)


def _as_step(value: Any) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


class SavedTrainingState:
    """The training state of one saved checkpoint tag, addressable by plain-model parameter name."""

    def __init__(self, tag_dir: Path, pipeline_stages: int, num_layers: int, expert_parallel: int = 1) -> None:
        self.tag_dir = Path(tag_dir)
        self.expert_parallel = expert_parallel
        self.pipeline_stages = pipeline_stages
        self.num_layers = num_layers
        self.to_model_name = model_names(num_layers, pipeline_stages)
        self._stage_files = sorted(self.tag_dir.glob("mp_rank_*_model_states.pt"))
        if len(self._stage_files) != pipeline_stages:
            raise CheckpointError(
                f"checkpoint {self.tag_dir}: expected {pipeline_stages} mp_rank_*_model_states.pt file(s) for "
                f"pipeline_stages={pipeline_stages}, found {len(self._stage_files)}")
        self._stage_states = [read_checkpoint_file(path, mmap=True) for path in self._stage_files]
        flat: dict[int, dict[int, Path]] = {}
        for path in self.tag_dir.iterdir():
            match = _FLAT_FILE.match(path.name)
            if match:
                flat.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
        self._flat_files = {stage: [ranks[r] for r in sorted(ranks)] for stage, ranks in flat.items()}
        self._module_state: Optional[dict[str, torch.Tensor]] = None
        self._tensors: Optional[dict[str, dict[str, list[tuple[int, int, torch.Tensor]]]]] = None
        self._shapes: dict[str, torch.Size] = {}
        self._steps: dict[str, float] = {}
        self._step_offset = 0

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
            self._module_state = saved_module_state(self.tag_dir, self.num_layers)
        return self._module_state


    # --- optimizer state ---------------------------------------------------------------------------------------

    @property
    def init_step_offset(self) -> int:
        """Optimizer steps the saving engine counted beyond the training steps (1 for DeepSpeed's bf16 ZeRO-0
        wrapper, which takes one zero-gradient step when it starts)."""
        self._build_index()
        return self._step_offset

    def shape(self, name: str) -> torch.Size:
        self._build_index()
        if name not in self._shapes:
            raise CheckpointError(f"checkpoint {self.tag_dir} holds no parameter {name!r} of this model")
        return self._shapes[name]

    def read(self, name: str, start: int = 0, numel: Optional[int] = None,
             keys: Optional[Iterable[str]] = None) -> dict[str, Any]:
        """Elements ``[start, start + numel)`` of the flattened fp32 master (``"master"``) and optimizer state
        tensors (``"exp_avg"``, ``"momentum_buffer"``, ...) of one parameter, plus its ``"step"``; only what
        ``keys`` names when given. Reads only the bytes asked for (the files are memory-mapped)."""
        size = self.shape(name).numel()
        numel = size - start if numel is None else numel
        if not 0 <= start <= start + numel <= size:
            raise ValueError(f"{name}: elements [{start}, {start + numel}) outside its {size}")
        wanted = None if keys is None else set(keys)
        out: dict[str, Any] = {}
        for key, pieces in self._tensors[name].items():
            if wanted is not None and key not in wanted:
                continue
            values = torch.empty(numel, dtype=torch.float32)
            for offset, length, flat in pieces:  # pieces in order along the flattened parameter
                lo, hi = max(start, offset), min(start + numel, offset + length)
                if lo < hi:
                    values[lo - start:hi - start] = flat[lo - offset:hi - offset]
            out[key] = values
        if name in self._steps and (wanted is None or "step" in wanted):
            out["step"] = self._steps[name]
        return out

    def optimizer_keys(self, name: str) -> set[str]:
        self._build_index()
        return set(self._tensors.get(name, {})) - {"master"} | ({"step"} if name in self._steps else set())

    def _build_index(self) -> None:
        """Where every parameter's pieces live: ``_tensors[name][key]`` = [(offset in the flattened parameter,
        length, flat 1-D view of the saved tensor)], plus shapes and step counts. No tensor data is read."""
        if self._tensors is not None:
            return
        self._tensors, self._shapes, self._steps, self._step_offset = {}, {}, {}, 0
        for stage, stage_state in enumerate(self._stage_states):
            if stage in self._flat_files:
                self._index_flat_partitions(stage)
            else:
                self._index_unpartitioned(stage, stage_state)

    def _add_piece(self, name: str, key: str, offset: int, flat: torch.Tensor) -> None:
        pieces = self._tensors.setdefault(name, {}).setdefault(key, [])
        # A tied parameter is saved by every stage that holds a copy: the copies are equal, keep the first.
        if not any(existing_offset == offset for existing_offset, _, _ in pieces):
            pieces.append((offset, flat.numel(), flat))

    def _is_expert_slice(self, name: str) -> bool:
        """Saved as one slice per expert-parallel rank (rank r: experts [r*L, (r+1)*L), contiguous when flat)."""
        return self.expert_parallel > 1 and name.rsplit(".", 1)[-1] in _EXPERT_WEIGHT_NAMES

    def _index_flat_partitions(self, stage: int) -> None:
        shapes: dict[str, torch.Size] = {}
        for shape_group in self._stage_states[stage].get("param_shapes") or []:
            for name, shape in shape_group.items():
                shapes[self.to_model_name(name)] = torch.Size(shape)
        if not shapes:  # DeepSpeed's BF16 optimizer without ZeRO records none: the module files have them
            shapes = {name: value.shape for name, value in self.module_state().items()}
        shapes = {name: (torch.Size((shape[0] * self.expert_parallel, *shape[1:])) if self._is_expert_slice(name)
                         else shape) for name, shape in shapes.items()}
        filled: dict[Any, int] = {}
        for dp_rank, path in enumerate(self._flat_files[stage]):  # rank order: fragments follow each other
            # Expert-parallel ranks are consecutive: an expert slice is partitioned over the ranks holding it.
            expert_rank = dp_rank % self.expert_parallel
            state = read_checkpoint_file(path, mmap=True).get("optimizer_state_dict", {})
            mappings = state.get("param_slice_mappings")
            if mappings is None:
                raise CheckpointError(
                    f"checkpoint file {path} has no param_slice_mappings (written by a DeepSpeed older than this "
                    f"reader supports); resume it with the layout that saved it")
            for group, mapping in enumerate(mappings):
                flat_master = state["single_partition_of_fp32_groups"][group]
                group_state = state["base_optimizer_state"]["state"].get(group, {})
                for saved_name, address in mapping.items():
                    name = self.to_model_name(saved_name)
                    if name not in shapes:
                        raise CheckpointError(f"checkpoint {self._stage_files[stage]}: no recorded shape for {name}")
                    self._shapes[name] = shapes[name]
                    key = (name, expert_rank) if self._is_expert_slice(name) else name
                    offset = filled.get(key, 0)
                    filled[key] = offset + address.numel
                    if self._is_expert_slice(name):
                        offset += expert_rank * shapes[name].numel() // self.expert_parallel
                    self._add_piece(name, "master", offset, flat_master.narrow(0, address.start, address.numel))
                    for key, value in group_state.items():
                        # DeepSpeed saves the fp32 partition without the group's end padding, the moments with it.
                        if torch.is_tensor(value) and value.dim() == 1 and value.numel() >= flat_master.numel():
                            self._add_piece(name, key, offset, value.narrow(0, address.start, address.numel))
                        elif key == "step":
                            self._steps[name] = _as_step(value)
        totals: dict[str, int] = {}
        for key, count in filled.items():
            name = key[0] if isinstance(key, tuple) else key
            totals[name] = totals.get(name, 0) + count
        for name, count in totals.items():
            if count != self._shapes[name].numel():
                raise CheckpointError(
                    f"checkpoint {self.tag_dir}: the optimizer partitions of stage {stage} hold {count} of the "
                    f"{self._shapes[name].numel()} elements of {name} (an optimizer file is missing)")

    def _index_unpartitioned(self, stage: int, stage_state: Mapping) -> None:
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
            self._step_offset = 1
        flat_names = [name for group in names for name in group]
        if len(flat_names) != sum(len(group["params"]) for group in optimizer["param_groups"]):
            raise CheckpointError(
                f"checkpoint file {path}: {len(flat_names)} recorded parameter names for an optimizer of "
                f"{sum(len(g['params']) for g in optimizer['param_groups'])} parameters")
        module = None if masters is not None else self.module_state()
        # Expert parallelism: DeepSpeed writes each expert-parallel rank's whole optimizer to its own file.
        expert_optimizers = {0: optimizer}
        for expert_rank in range(1, self.expert_parallel):
            expert_file = self.tag_dir / f"expp_rank_{expert_rank}_mp_rank_{stage:02d}_optim_states.pt"
            if not expert_file.is_file():
                raise CheckpointError(f"checkpoint {self.tag_dir}: {expert_file.name} is missing")
            expert_optimizers[expert_rank] = read_checkpoint_file(expert_file, mmap=True)["optimizer"]
        for index, name in enumerate(flat_names):
            master = masters[index] if masters is not None else module[name]
            self._shapes[name] = master.shape
            self._add_piece(name, "master", 0, master.reshape(-1))
            ranks = range(self.expert_parallel) if self._is_expert_slice(name) else range(1)
            for expert_rank in ranks:
                offset = expert_rank * master.numel() // self.expert_parallel
                for key, value in expert_optimizers[expert_rank]["state"].get(index, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        self._add_piece(name, key, offset, value.reshape(-1))
                    else:
                        self._steps[name] = _as_step(value)


# --- deciding ---------------------------------------------------------------------------------------------------


def layout_changes(marker: Mapping[str, Any], current: Mapping[str, Any], tag_dir: Path) -> list[str]:
    """How the layout ``current`` differs from the one that saved the checkpoint ``tag_dir`` (marker fields):
    ``["parallel.pipeline_stages: 2 -> 1", ...]``; empty when DeepSpeed can load it as it is. ``current`` holds
    ``pipeline_stages``, ``pipeline_parts`` (None without pipelining), ``zero_stage``, ``precision``,
    ``data_parallel`` and ``optimizer``. Raises CheckpointError for changes nothing can carry over."""
    saved_stages = int(marker.get("pipeline_stages") or 1)
    saved_optimizer = marker.get("optimizer")
    if saved_optimizer is not None and saved_optimizer != current["optimizer"]:
        raise CheckpointError(
            f"checkpoint {tag_dir} was saved with optim.name={saved_optimizer}; this run has "
            f"optim.name={current['optimizer']}, whose state cannot be made from it (resume with "
            f"optim={saved_optimizer}, or start a new run from the exported weights)")
    fields = [("parallel.pipeline_stages", saved_stages, current["pipeline_stages"]),
              ("parallel.zero_stage", marker.get("zero_stage"), current["zero_stage"]),
              ("train.precision", marker.get("precision"), current["precision"]),
              ("pipeline stage cuts", marker.get("pipeline_parts"), current["pipeline_parts"]),
              ("parallel.expert_parallel", marker.get("expert_parallel") or 1, current.get("expert_parallel", 1))]
    sharded = any(_FLAT_FILE.match(Path(name).name) for name in marker.get("files", {}))
    if sharded:  # DeepSpeed cannot re-partition optimizer shards for another data-parallel degree
        saved_world = int(marker.get("world_size") or saved_stages)
        fields.append(("data-parallel ranks", saved_world // saved_stages, current["data_parallel"]))
    # Checkpoints from before a field was recorded hold None there: that field is taken as unchanged.
    changes = [f"{name}: {old} -> {new}" for name, old, new in fields if old is not None and old != new]
    if changes and 3 in (marker.get("zero_stage"), current["zero_stage"]):
        raise CheckpointError(
            f"checkpoint {tag_dir}: {', '.join(changes)}; a layout change to or from ZeRO-3 is not supported "
            f"(resume with the layout that saved it, or export the weights)")
    if not changes and sharded and saved_stages > 1 and marker.get("zero_stage") == 0:
        # DeepSpeed's pipelined bf16 optimizer without ZeRO writes checkpoints its own load cannot read back.
        changes = ["pipelined bf16 optimizer shards (DeepSpeed cannot load them itself)"]
    return changes


# --- writing into a new engine --------------------------------------------------------------------------------


def _required_key(group: Optional[dict]) -> str:
    return "momentum_buffer" if group is not None and group.get("kind", group.get("name")) == "muon" else "exp_avg"


def _check_keys(saved: SavedTrainingState, name: str, required: str) -> None:
    keys = saved.optimizer_keys(name)
    if keys and required not in keys:
        raise CheckpointError(
            f"saved optimizer state of {name} has {sorted(keys)}, this run's optimizer needs '{required}' "
            f"(resume with the optimizer that saved it)")


def _group_of(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> Optional[dict]:
    for group in optimizer.param_groups:
        if any(member is param for member in group["params"]):
            return group
    return None


def _restore_plain(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter], saved: SavedTrainingState,
                   step_shift: int, masters: Optional[Mapping[int, torch.Tensor]] = None,
                   starts: Mapping[str, int] = {}) -> None:
    """An unpartitioned torch optimizer; ``masters`` maps a model parameter's id to its fp32 copy, if any.
    One parameter at a time, so only one parameter's full state is in memory at once."""
    for name, param in params.items():
        target = masters[id(param)] if masters is not None else param
        _check_keys(saved, name, _required_key(_group_of(optimizer, target)))
        values = saved.read(name, starts.get(name, 0), param.numel())
        master = values.pop("master").view(param.shape)
        with torch.no_grad():
            target.copy_(master)
            if target is not param:
                param.copy_(master)
        state = {key: (value.to(target.device).view(param.shape) if torch.is_tensor(value)
                       else torch.tensor(value + step_shift, dtype=torch.float32))
                 for key, value in values.items()}
        if state:
            optimizer.state[target] = state


def _restore_flat(optimizer: Any, params: Mapping[str, nn.Parameter], saved: SavedTrainingState,
                  step_shift: int, starts: Mapping[str, int] = {}) -> None:
    """ZeRO-1/2 or DeepSpeed's BF16 optimizer: each parameter maps to a fragment of a flat fp32 partition; only
    that fragment of its optimizer state is read."""
    base = optimizer.optimizer
    for name, param in params.items():
        # Every rank holds the whole working copy; its partition holds only a fragment of the rest.
        master = saved.read(name, starts.get(name, 0), param.numel(), keys=("master",))["master"]
        with torch.no_grad():
            param.copy_(master.view(param.shape))
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # none of this parameter lives in this rank's partition
            continue
        _check_keys(saved, name, "exp_avg")
        start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        hp_start = mapping.hp_fragment_address.start
        flat_param = base.param_groups[mapping.param_group_index]["params"][0]
        with torch.no_grad():
            mapping.hp_fragment.copy_(master.narrow(0, start, numel))
        values = saved.read(name, starts.get(name, 0) + start, numel, keys=saved.optimizer_keys(name))
        state = base.state[flat_param]
        for key, value in values.items():
            if torch.is_tensor(value):
                if key not in state:
                    state[key] = torch.zeros_like(flat_param, dtype=torch.float32)
                state[key].narrow(0, hp_start, numel).copy_(value)
            else:
                state[key] = torch.tensor(value + step_shift, dtype=torch.float32)
    # DeepSpeed links these views after its first step; its accessors (safe_get_full_optimizer_state) need them.
    for param in params.values():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            flat_param = base.param_groups[mapping.param_group_index]["params"][0]
            mapping.set_optim_state_fragment(flat_param, base.state[flat_param])


def _restore_schedule(scheduler: Any, saved_state: Optional[dict]) -> None:
    """The schedule's position from the checkpoint, its per-group peaks from this run's optimizer groups (they are
    matched by nothing positional: another layout may hold other groups on a rank)."""
    if scheduler is None or saved_state is None:
        return
    scheduler.last_epoch = int(saved_state["last_epoch"])
    scheduler._step_count = int(saved_state.get("_step_count", scheduler.last_epoch + 1))
    lrs = [base_lr * schedule(scheduler.last_epoch)
           for schedule, base_lr in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def restore_engine(engine: Any, saved: SavedTrainingState, to_model_name: Callable[[str], str],
                   expert_slice: Optional[tuple[int, int]] = None) -> dict:
    """Write ``saved`` into ``engine`` (weights, buffers, optimizer, LR schedule, step counters); returns the
    client state. ``to_model_name`` translates the engine module's parameter names to plain-model names.
    ``expert_slice = (expert-parallel rank, degree)``: the engine's routed-expert weights hold that slice of
    the experts (parameters marked ``allreduce = False``)."""
    module = engine.module
    params = {to_model_name(name): param for name, param in module.named_parameters() if param.requires_grad}
    starts: dict[str, int] = {}
    if expert_slice is not None:
        expert_rank, degree = expert_slice
        starts = {name: expert_rank * param.numel() for name, param in params.items()
                  if getattr(param, "allreduce", True) is False}
    for name, param in params.items():
        expected = param.shape
        if name in starts:
            expected = torch.Size((param.shape[0] * expert_slice[1], *param.shape[1:]))
        if saved.shape(name) != expected:
            raise CheckpointError(
                f"checkpoint {saved.tag_dir}: {name} has shape {tuple(saved.shape(name))}, this model "
                f"{tuple(expected)}")
    module_state = saved.module_state()
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            model_name = to_model_name(name)
            if model_name in module_state:
                buffer.copy_(module_state[model_name].to(buffer.dtype))

    optimizer = engine.optimizer
    unfused_bf16 = hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups")
    step_shift = int(unfused_bf16) - saved.init_step_offset
    if any(getattr(param, "_hp_mapping", None) is not None for param in params.values()):
        _restore_flat(optimizer, params, saved, step_shift, starts)
    elif unfused_bf16:
        masters = {id(low): high for lows, highs in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                   for low, high in zip(lows, highs)}
        _restore_plain(optimizer.optimizer, params, saved, step_shift, masters, starts)
    elif isinstance(optimizer, torch.optim.Optimizer):
        _restore_plain(optimizer, params, saved, step_shift, starts=starts)
    else:
        raise CheckpointError(
            f"cannot write optimizer state into a {type(optimizer).__name__} (supported: torch optimizers under "
            f"ZeRO-0, ZeRO-1/2 partitions, DeepSpeed's bf16 optimizers)")
    _restore_schedule(engine.lr_scheduler, saved.lr_scheduler_state)
    for key, value in saved.engine_counters.items():
        setattr(engine, key, value)
    return saved.client_state
