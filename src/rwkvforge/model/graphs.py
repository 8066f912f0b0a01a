"""CUDA-graph capture of `RWKV7.step` for decoding: one graph per batch size, replayed.

On a GPU a decode step of a 0.1B-1.5B RWKV-7 is a few hundred small kernels; one stream waits
on their launches more than on the GPU. `GraphedStep.step(idx, state)` records a batch size's
step once (after two warm-up steps that fill the model's caches) and afterwards replays it:
one launch per token. The graph reads and writes static buffers: the caller's token ids and
state are copied in (the state only when it is not the one the last replay returned: the
engine's decode batch, fed back step after step, is not copied), the logits and new state
come back in the graph's buffers, valid until the next replay of that batch size. A graph
reads the weights where they are, but the small tensors the step derives from them
(`RWKV7._step_consts`) as they were at capture: after changing a model's parameters, build a
new `GraphedStep` (a new engine).

`generate.Engine` uses it on CUDA for models without per-row adapters (serve's multi-LoRA
switches adapters in Python, which a graph would freeze). Any failure to capture (an
operation that syncs with the CPU, an old driver) is reported once and the engine goes on
with the eager step; `RWKVFORGE_CUDA_GRAPHS=0` turns it off. The capture API is a parameter
(`api`): tests and the GPU acceptance script's CPU smoke run drive the bookkeeping with
`ReplayApi`, which re-runs the recorded body, what a replay does to the same buffers.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch


def _flat(state: Any) -> list[torch.Tensor]:
    """The tensors of a step state (a list of per-layer tuples), in order."""
    return [t for layer in state for t in layer]


class CudaApi:
    """torch.cuda's capture: `capture(body)` -> (replay, body's outputs)."""

    @staticmethod
    def capture(body: Callable[[], Any], warmup: Callable[[], Any]) -> tuple[Callable, Any]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: caches, cuBLAS workspaces
            warmup()
            warmup()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = body()
        return graph.replay, out


class ReplayApi:
    """`CudaApi`'s stand-in on a CPU: two warm-ups, nothing runs at capture, and a replay runs
    the recorded body again on the same buffers, which is what a graph replay does. For the
    tests and bench/gpu_acceptance.py's --smoke run (no speed meaning)."""

    @staticmethod
    def capture(body: Callable[[], Any], warmup: Callable[[], Any]) -> tuple[Callable, Any]:
        warmup()
        warmup()
        return body, None


def enabled() -> bool:
    return os.environ.get("RWKVFORGE_CUDA_GRAPHS", "1") not in ("0", "false", "no")


class GraphedStep:
    """`step(idx (B,), state) -> (logits (B,V), state)` as `model.step`, replayed from a
    graph per batch size (see the module doc). `failed`: why capture was given up (then every
    call is the eager step)."""

    def __init__(self, model: Any, api: Any = None, max_graphs: int = 16):
        self.model = model
        self.api = api if api is not None else CudaApi()
        self.max_graphs = max_graphs
        self.graphs: dict[int, tuple] = {}  # B -> (replay, idx, state, logits)
        self.failed: str | None = None

    def step(self, idx: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        if self.failed is not None:
            return self.model.step(idx, state)
        B = int(idx.shape[0])
        g = self.graphs.get(B)
        if g is None:
            if len(self.graphs) >= self.max_graphs:
                return self.model.step(idx, state)
            try:
                g = self.graphs[B] = self._capture(idx, state)
            except Exception as e:  # noqa: BLE001 - any capture failure: eager from now on
                self.failed = f"{type(e).__name__}: {e}"
                print(f"[rwkvforge] CUDA graph capture failed ({self.failed}); decoding "
                      "without graphs", file=sys.stderr)
                return self.model.step(idx, state)
        replay, sidx, sstate, slogits = g
        sidx.copy_(idx)
        if state is not sstate:
            for d, s in zip(_flat(sstate), _flat(state)):
                d.copy_(s)
        replay()
        return slogits, sstate

    def _capture(self, idx: torch.Tensor, state: Any) -> tuple:
        sidx = idx.clone()
        sstate = [tuple(t.clone() for t in layer) for layer in state]
        logits0, _ = self.model.step(sidx, [tuple(t.clone() for t in layer) for layer in state])
        slogits = torch.empty_like(logits0)

        def body() -> None:  # the recorded step: its results into the static buffers
            logits, new = self.model.step(sidx, sstate)
            slogits.copy_(logits)
            for d, s in zip(_flat(sstate), _flat(new)):
                d.copy_(s)

        def warmup() -> None:
            self.model.step(sidx, [tuple(t.clone() for t in layer) for layer in sstate])

        replay, _ = self.api.capture(body, warmup)
        return replay, sidx, sstate, slogits


__all__ = ["CudaApi", "GraphedStep", "ReplayApi", "enabled"]
