"""Expert parallelism: each rank of an expert-parallel group holds ``num_experts / E`` routed experts of every MoE
layer, and token-expert pairs travel to the rank owning their expert with all-to-all (variable split sizes,
dropless) and back.

``shard_experts(model, ep_size, ep_rank, group)`` turns a plain ``HybridDecoder`` (built identically on every
rank) into its expert-parallel form in place: each ``MoE`` keeps the contiguous slice
``[ep_rank * L, (ep_rank + 1) * L)`` of its stacked expert weights (L = num_experts / E, so global expert
``g`` lives on rank ``g // L``) and gets an :class:`ExpertDispatch`. Router, expert bias, load counters and
shared experts stay whole and replicated. Expert ranks are consecutive (DeepSpeed's ``ep_size_E`` groups:
``[0, 1], [2, 3], ...`` for E = 2); the replicas of one expert slice form the expert-data-parallel group, over
which DeepSpeed reduces (and under ZeRO partitions) the expert parameters' gradients (``allreduce = False``,
``group_name``, see :func:`mark_expert_parameters`).

The dispatch (per MoE call, R pairs on this rank already sorted by global expert):

    1. all-to-all of the per-expert pair counts ``[E, L]`` -> how many rows each source sends each local expert;
    2. all-to-all of the rows ``[R, D]`` (rank r receives the pairs of experts ``r*L .. r*L+L-1``);
    3. regroup the received rows by local expert (stable: source-rank order inside an expert), run the
       experts' SwiGLU, undo the regrouping;
    4. all-to-all back with the split sizes reversed.

Both row all-to-alls are an autograd Function whose backward is the reverse all-to-all, so gradients of the
inputs return to the ranks that sent them and expert weight gradients collect every rank's pairs.

With pipeline stages (P x EP x DP) every stage forms its own expert groups over its data-parallel replicas
(DeepSpeed's pipe x data topology numbers ranks ``stage * DP + dp_rank``, so a stage's ranks are consecutive and
E divides DP): the all-to-all of a stage's MoE layers never leaves the stage.

Checkpoints: DeepSpeed writes rank 0's module only (under pipelining, each stage's data-parallel rank 0's layers),
so each expert slice is also saved by the first replica of the slice (expert-data-parallel rank 0) in
``expert_shard_{ep_rank:03d}_of_{E:03d}.pt``, or per stage ``expert_shard_{ep_rank:03d}_of_{E:03d}_stage_{s:02d}.pt``
({plain parameter name: slice}); :func:`merge_expert_shards` rebuilds the whole stacked tensors for export and
for a resume on another expert-parallel degree.

Shape legend: R routed pairs on this rank, D hidden, E expert-parallel ranks, L experts per rank.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

EXPERT_WEIGHT_NAMES = ("w_gate", "w_up", "w_down")
_SHARD_FILE = re.compile(r"^expert_shard_(\d+)_of_(\d+)(?:_stage_(\d+))?\.pt$")


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert-parallel / expert-data-parallel group pair of degree ``ep_size``."""
    return f"ep_size_{ep_size}"


def shard_file_name(ep_rank: int, ep_size: int, stage: Optional[int] = None) -> str:
    """The file of one expert slice; ``stage``: the pipeline stage whose layers it holds (None without stages)."""
    suffix = "" if stage is None else f"_stage_{stage:02d}"
    return f"expert_shard_{ep_rank:03d}_of_{ep_size:03d}{suffix}.pt"


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` over ``group`` with uneven splits; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x_RD, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x_RD.new_empty((sum(recv_splits), *x_RD.shape[1:]))
        dist.all_to_all_single(out, x_RD.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(send_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), output_split_sizes=send_splits,
                               input_split_sizes=recv_splits, group=ctx.group)
        return grad_in, None, None, None


class ExpertDispatch:
    """The ``MoE.expert_dispatch`` of one layer under expert parallelism; counts the bytes it sends to other
    ranks (forward and backward) in ``bytes_sent`` until :meth:`take_bytes_sent`."""

    def __init__(self, ep_size: int, ep_rank: int, group):
        self.ep_size, self.ep_rank, self.group = ep_size, ep_rank, group
        self.bytes_sent = 0

    def take_bytes_sent(self) -> int:
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent

    def __call__(self, x_sorted_RD: torch.Tensor, pairs_per_expert_E: torch.Tensor,
                 expert_ffn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        E = self.ep_size
        send_counts_EL = pairs_per_expert_E.to(torch.int64).view(E, -1)
        recv_counts_EL = torch.empty_like(send_counts_EL)
        dist.all_to_all_single(recv_counts_EL, send_counts_EL.contiguous(), group=self.group)
        send_splits = send_counts_EL.sum(dim=1).tolist()
        recv_splits = recv_counts_EL.sum(dim=1).tolist()

        x_recv_RD = _AllToAll.apply(x_sorted_RD, send_splits, recv_splits, self.group)
        # Received rows: by source rank, then by local expert; the experts want them by local expert.
        L = recv_counts_EL.shape[1]
        local_expert_R = torch.repeat_interleave(
            torch.arange(L, device=x_recv_RD.device).repeat(E), recv_counts_EL.reshape(-1).to(x_recv_RD.device))
        by_expert_R = torch.argsort(local_expert_R, stable=True)
        y_grouped_RD = expert_ffn(x_recv_RD.index_select(0, by_expert_R), recv_counts_EL.sum(dim=0))
        undo_R = torch.empty_like(by_expert_R)
        undo_R[by_expert_R] = torch.arange(by_expert_R.numel(), device=by_expert_R.device)
        y_recv_RD = y_grouped_RD.index_select(0, undo_R)
        y_sorted_RD = _AllToAll.apply(y_recv_RD, recv_splits, send_splits, self.group)

        row_bytes = x_sorted_RD.shape[1] * x_sorted_RD.element_size()
        leaving = sum(send_splits) - send_splits[self.ep_rank]  # pairs of other ranks' experts
        returning = sum(recv_splits) - recv_splits[self.ep_rank]  # outputs sent back to other ranks
        # Forward sends rows out and outputs back; backward sends the same amounts the other way round.
        self.bytes_sent += 2 * (leaving + returning) * row_bytes
        return y_sorted_RD


def moe_modules(module: nn.Module) -> list[nn.Module]:
    from attnres_train.model.moe import MoE

    return [m for m in module.modules() if isinstance(m, MoE)]


def shard_experts(model: nn.Module, ep_size: int, ep_rank: int, group) -> list[ExpertDispatch]:
    """Keep this rank's expert slice in every MoE of ``model`` and install the dispatch; returns the dispatches
    (for the traffic counters). ``ep_size`` must divide every layer's ``num_experts``."""
    dispatches = []
    for moe in moe_modules(model):
        if moe.num_experts % ep_size:
            raise ValueError(f"parallel.expert_parallel={ep_size}: must divide model.num_experts={moe.num_experts}")
        local = moe.num_experts // ep_size
        for name in EXPERT_WEIGHT_NAMES:
            whole = getattr(moe, name)
            setattr(moe, name, nn.Parameter(whole.detach()[ep_rank * local:(ep_rank + 1) * local].clone()))
        moe.expert_dispatch = ExpertDispatch(ep_size, ep_rank, group)
        dispatches.append(moe.expert_dispatch)
    return dispatches


def expert_parameter_names(module: nn.Module) -> set[str]:
    """Qualified names (as ``module.named_parameters`` gives them) of the routed-expert weights."""
    from attnres_train.model.moe import MoE

    names = set()
    for prefix, sub in module.named_modules():
        if isinstance(sub, MoE):
            names.update(f"{prefix}.{name}" if prefix else name for name in EXPERT_WEIGHT_NAMES)
    return names


def mark_expert_parameters(module: nn.Module, ep_size: int) -> None:
    """DeepSpeed's marking of expert parameters: no data-parallel all-reduce, reduce over the named group's
    expert-data-parallel ranks instead (and partition over them under ZeRO-1/2)."""
    params = dict(module.named_parameters())
    for name in expert_parameter_names(module):
        params[name].allreduce = False
        params[name].group_name = expert_group_name(ep_size)


def is_expert_parameter(param: nn.Parameter) -> bool:
    return getattr(param, "allreduce", True) is False


def create_expert_groups(ep_size: int, pipeline_stages: int = 1):
    """DeepSpeed's expert-parallel and expert-data-parallel groups of degree ``ep_size`` (idempotent), inside
    each of ``pipeline_stages`` blocks of consecutive ranks; returns ``(expert-parallel group, this rank's place
    in it)``."""
    from deepspeed.utils import groups

    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, pp_size=pipeline_stages)
    return groups._get_expert_parallel_group(name), groups._get_expert_parallel_rank(name)


def expert_data_parallel_rank(ep_size: int) -> int:
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_rank(expert_group_name(ep_size))


def deepspeed_moe_marker(num_experts: int, ep_size: int, pipeline_stages: int = 1) -> nn.Module:
    """A parameterless module whose presence makes DeepSpeed treat the model as an MoE model: its engine then
    reduces ``allreduce = False`` parameters over their expert-data-parallel group, its ZeRO-1/2 optimizer
    partitions ``moe`` parameter groups over that group and averages expert gradient norms correctly, and it
    saves the optimizer state of every expert-parallel rank. DeepSpeed only recognises its own ``MoE`` class;
    this subclass carries the attributes DeepSpeed reads and none of its layers (it holds no experts of its own:
    the expert slices are saved by the trainer, see :func:`expert_shard_state`)."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class ExpertParallelMarker(DeepSpeedMoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.expert_group_name = expert_group_name(ep_size)
            self.num_local_experts = 0  # nothing for DeepSpeed's per-expert checkpoint files

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            create_expert_groups(ep_size, pipeline_stages)

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertParallelMarker only tags the model for DeepSpeed; it is never called")

    return ExpertParallelMarker()


# --- checkpoints -----------------------------------------------------------------------------------------------


def expert_shard_state(module: nn.Module, to_model_name: Callable[[str], str]) -> dict[str, torch.Tensor]:
    names = expert_parameter_names(module)
    return {to_model_name(name): param.detach().cpu().clone()
            for name, param in module.named_parameters() if name in names}


def shard_files(tag_dir: Path) -> dict[int, list[Path]]:
    """``{ep_rank: paths}`` of a checkpoint's expert shards, one path per pipeline stage in stage order (empty for
    a run without expert parallelism)."""
    found: dict[int, list[tuple[int, Path]]] = {}
    for path in Path(tag_dir).iterdir():
        match = _SHARD_FILE.match(path.name)
        if match:
            found.setdefault(int(match.group(1)), []).append((int(match.group(3) or 0), path))
    return {rank: [path for _, path in sorted(paths)] for rank, paths in found.items()}


def merge_expert_shards(tag_dir: Path, state: dict, read: Callable[[Path], dict]) -> dict:
    """``state`` (plain-model names) with every expert weight replaced by the concatenation of all saved slices,
    in expert order; unchanged for a checkpoint without expert shards."""
    files = shard_files(tag_dir)
    if not files:
        return state
    slices: dict[str, list[torch.Tensor]] = {}
    stages = max(len(paths) for paths in files.values())
    for ep_rank in range(len(files)):
        if len(files.get(ep_rank, ())) != stages:
            raise FileNotFoundError(f"{tag_dir}: expert shard {ep_rank} of {len(files)} is missing"
                                    + (f" for some of the {stages} pipeline stages" if stages > 1 else ""))
        for path in files[ep_rank]:
            for name, value in read(path).items():
                slices.setdefault(name, []).append(value)
    return {**state, **{name: torch.cat(parts, dim=0) for name, parts in slices.items()}}


def load_expert_shard(tag_dir: Path, module: nn.Module, ep_size: int, ep_rank: int,
                      to_model_name: Callable[[str], str], read: Callable[[Path], dict],
                      stage: Optional[int] = None) -> None:
    """Copy this rank's slice of every expert weight of ``module`` (a pipeline ``stage``'s module under
    pipelining) from a checkpoint saved under the same layout (DeepSpeed loads rank 0's slice into every rank's
    module)."""
    saved = read(Path(tag_dir) / shard_file_name(ep_rank, ep_size, stage))
    names = expert_parameter_names(module)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name in names:
                param.copy_(saved[to_model_name(name)])


def local_expert_range(ep_size: int, ep_rank: int, num_experts: int) -> tuple[int, int]:
    local = num_experts // ep_size
    return ep_rank * local, (ep_rank + 1) * local


def total_bytes_sent(dispatches: list[ExpertDispatch]) -> Optional[int]:
    if not dispatches:
        return None
    return sum(d.take_bytes_sent() for d in dispatches)
