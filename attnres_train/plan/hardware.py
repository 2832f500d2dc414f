"""A cluster as the planner sees it, and the GPUs it knows by name.

Bandwidths are per GPU, one direction, in bytes/s: ``intra_node_bandwidth`` between GPUs of one node (NVLink),
``inter_node_bandwidth`` what one GPU can send to other nodes (its share of the network). Peak FLOP/s are dense
bf16 tensor-core figures from the vendors' data sheets; ``mfu`` scales them to what a step achieves.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9

# name: (memory per GPU in bytes, dense bf16 peak FLOP/s, NVLink bytes/s per direction)
GPUS = {
    "h100-80gb": (80 * GB, 989e12, 450 * GB),
    "h200": (141 * GB, 989e12, 450 * GB),
    "a100-80gb": (80 * GB, 312e12, 300 * GB),
}


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    nodes: int
    memory_per_gpu: float  # bytes
    peak_flops: float  # per GPU
    intra_node_bandwidth: float  # bytes/s per GPU
    inter_node_bandwidth: float  # bytes/s per GPU
    mfu: float  # assumed fraction of peak the compute reaches
    usable_memory_fraction: float = 0.9  # the rest: CUDA context, allocator fragmentation, NCCL buffers

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def describe(self) -> str:
        return (f"{self.nodes} x {self.gpus_per_node} GPUs, {self.memory_per_gpu / GB:.0f} GB each "
                f"({self.usable_memory_fraction:.0%} usable), {self.peak_flops / 1e12:.0f} TFLOP/s peak at "
                f"{self.mfu:.0%} MFU, {self.intra_node_bandwidth / GB:.0f} GB/s in a node, "
                f"{self.inter_node_bandwidth / GB:.0f} GB/s per GPU between nodes")
