"""Decode steps with static shapes, replayed as CUDA graphs (`Engine(cuda_graphs=True)`).

A decode step of a small batch on a GPU is a few hundred kernels of microseconds each, and the
host's Python and dispatch between them take longer than the kernels: the GPU mostly waits. A
CUDA graph records the step's kernels once and replays them with one launch. A graph replays
fixed shapes and fixed addresses, and a decode step has neither: the batch changes as requests
come and go, and the keys read grow by one every step. So `DecodeGraphs` makes the step static:

- rows are padded up to a bucket of batch sizes (1, 2, 4, 8, ... up to max_batch); padding rows
  decode token 0 at position 0 into a scratch cache row the engine never hands out (KVCache gets
  max_batch + 1 rows), so they touch no request's keys;
- keys are read up to a bucket of cache lengths (64, 128, 256, ... up to max_len), masked past
  each row's own length as any decode step masks them, and `MoETransformer.forward(num_keys=)`
  takes that length from here rather than from `positions.max()`, a host read;
- inputs (tokens, positions, cache rows, which rows are real) are copied in one transfer into
  buffers the graphs were captured on, and the outputs are read from the graphs' own;
- expert loads are counted over real rows only, inside the step, from each MoE layer's choices
  (MoEStats.expert_TK): padding rows are routed like any token but load nothing.

Each (batch bucket, key bucket) is captured the first time a step needs it (one shared memory
pool), after two eager runs on a side stream for lazy initializations; a step's cache writes are
idempotent, so those runs change nothing the replay does not write again. The graphs hold the
addresses of the model's weights and the cache: the engine's model must not be moved, reloaded
or merged after the first capture.

On a CPU model the same static steps run eagerly, uncaptured (no faster than the engine's own
steps, and padded): that is how tests/unit/test_engine.py holds them to the engine's dynamic steps
here, while tests/gpu/checks.py holds the replayed graphs to the eager static steps on a GPU.

Why not torch.compile(mode="reduce-overhead"), which also replays CUDA graphs: it records a
graph for every distinct set of input sizes, dynamic shapes included (inductor's
`cudagraph_dynamic_shape_warn_limit` warns past 8), and the cache length a decode step reads
changes every step. What makes the step replayable is the bucketing and padding above, which are
ours to choose either way; the capture itself is torch's public `torch.cuda.CUDAGraph` (as vLLM
and SGLang capture their decode steps).
"""

from __future__ import annotations

import time

import torch

from raymoe.model.moe import count_per_expert
from raymoe.model.transformer import KVCache, MoETransformer


def buckets(largest: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below `largest`, then `largest` itself."""
    out, size = [], smallest
    while size < largest:
        out.append(size)
        size *= 2
    return out + [largest]


class DecodeGraphs:
    """Static-shape decode steps over one engine's model and cache; `step` runs one."""

    MIN_KEYS = 64
    """The smallest key bucket: shorter caches cost the same to read."""

    def __init__(self, model: MoETransformer, cache: KVCache, max_batch: int, *, capture: bool | None = None):
        if cache.max_batch < max_batch + 1:
            raise ValueError(f"a KVCache of {cache.max_batch} rows has no scratch row for {max_batch} sequences; build it with max_batch + 1")
        if any(moe.router.capacity_factor is not None or moe.router.gate_threshold > 0 for moe in model.moe_layers()):
            raise ValueError("CUDA graphs need dropless routing (model.capacity_factor null, gate_threshold 0): capacity and "
                             "thresholds filter slots through a host read, and padding rows would take capacity")
        self.model, self.cache = model, cache
        self.device = model.embed.weight.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, not {self.device}")
        self.scratch = cache.max_batch - 1
        self.batch_buckets = buckets(max_batch)
        self.key_buckets = buckets(cache.max_len, min(self.MIN_KEYS, cache.max_len))
        self.num_experts = model.cfg.num_experts
        # rows: token, position, cache row, real (1) or padding (0)
        self.inputs = torch.zeros(4, max_batch, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.capture_s = 0.0
        """Seconds spent capturing, all buckets together (warm-up runs included)."""
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    def bucket_of(self, num_rows: int, num_keys: int) -> tuple[int, int]:
        """The (batch, key length) bucket a step of `num_rows` rows reading `num_keys` positions runs in."""
        return (next(b for b in self.batch_buckets if b >= num_rows), next(t for t in self.key_buckets if t >= num_keys))

    def step(self, slots: list[int], tokens: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode step: each row's `tokens` at its `positions` in cache rows `slots`. Returns
        the last logits [rows, V] (valid until the next step) and the tokens each MoE layer routed
        to each expert, long [moe layers, E] (None for a model without MoE layers)."""
        n = len(slots)
        B, T = self.bucket_of(n, max(positions) + 1)
        host = torch.zeros(4, B, dtype=torch.long)
        host[:, :n] = torch.tensor([tokens, positions, slots, [1] * n])
        host[2, n:] = self.scratch
        self.inputs[:, :B].copy_(host)
        if not self.capture:
            logits, loads = self._static_step(B, T)
        else:
            if (B, T) not in self.graphs:
                self.graphs[B, T] = self._capture(B, T)
            graph, (logits, loads) = self.graphs[B, T]
            graph.replay()
        return logits[:n], loads

    def _static_step(self, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens, positions, slots, real = self.inputs[0, :B, None], self.inputs[1, :B, None], self.inputs[2, :B], self.inputs[3, :B]
        out = self.model(tokens, self.cache, slots, positions, num_keys=T)
        loads = None
        if out.moe_stats:
            loads = torch.stack([count_per_expert(st.expert_TK.flatten(), self.num_experts,
                                                  real.repeat_interleave(st.expert_TK.shape[1]))
                                 for st in out.moe_stats])
        return out.logits[:, -1], loads

    def _capture(self, B: int, T: int) -> tuple[torch.cuda.CUDAGraph, tuple]:
        t0 = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # lazy initializations (cuBLAS workspaces, kernels) happen outside the capture
            for _ in range(2):
                self._static_step(B, T)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a metrics read of the engine's load) do not
        # invalidate this thread's capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = self._static_step(B, T)
        self.capture_s += time.perf_counter() - t0
        return graph, outputs
