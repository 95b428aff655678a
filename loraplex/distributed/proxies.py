"""Rank 0's seam: proxies that send each model call and LoRA slot change to the workers
(``channel.Command``) before running it here, installed by ``TPExecutor.attach``.

- the model: ``forward`` sends the token ids, positions and the ``ForwardBatch``;
  ``compute_logits`` sends its hidden rows (or says "the last forward's output") and the
  batch it runs under (or says "the last forward's", with its LoRA segments again);
- the decode graphs: each rank replays its own graph on the same host inputs;
- the LoRA buffers: a slot write sends the full adapter (each rank's buffers keep only their
  shard), a clear the slot.
"""

from __future__ import annotations

import weakref

import torch

from loraplex.distributed.channel import LAST, SAME, Command, pack_batch
from loraplex.distributed.executor import TPExecutor
from loraplex.layers.forward_context import current_forward_batch, get_forward_batch


class ModelProxy:
    """The model as rank 0's runner sees it: each call is sent to the workers first."""

    def __init__(self, model: torch.nn.Module, executor: TPExecutor) -> None:
        self.model = model
        self.executor = executor
        self._last_batch = None
        # a weak reference: holding a prefill's [T, hidden] output between steps would take
        # memory the KV-cache sizing did not count
        self._last_hidden: weakref.ref | None = None

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch = get_forward_batch()
        self.executor.send(Command.FORWARD, (ids, positions, pack_batch(batch)))
        self._last_batch, self._last_hidden = batch, None
        hidden = self.executor.guard(lambda: self.model(ids, positions))
        self._last_hidden = weakref.ref(hidden)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        batch = current_forward_batch()
        if batch is None:
            wire_batch = None
        elif batch is self._last_batch:  # the usual case: only the LoRA batch is sent again
            wire_batch = (SAME, pack_batch(batch)["lora"])
        else:
            wire_batch = pack_batch(batch)
        # the last forward's output (decode) is already on every rank; rows of it are sent
        last = self._last_hidden() if self._last_hidden is not None else None
        wire_hidden = LAST if hidden is last else hidden
        self.executor.send(Command.LOGITS, (wire_hidden, wire_batch))
        return self.executor.guard(lambda: self.model.compute_logits(hidden))

    def __getattr__(self, name: str):
        return getattr(self.model, name)


class DecodeGraphsProxy:
    """Rank 0's decode graphs: every rank replays its own graph on the same host inputs."""

    def __init__(self, graphs, executor: TPExecutor) -> None:
        self.graphs = graphs
        self.executor = executor

    def run(self, *inputs) -> torch.Tensor:
        self.executor.send(Command.DECODE_GRAPH, inputs)
        return self.executor.guard(lambda: self.graphs.run(*inputs))

    def __getattr__(self, name: str):
        return getattr(self.graphs, name)


class LoRABuffersProxy:
    """Rank 0's LoRA buffers: a slot write sends the full adapter, each rank writes its shard.
    After the executor stopped, writes and clears stay local (nothing reads them any more:
    every model call raises), so releasing a dead engine's requests cannot fail."""

    def __init__(self, buffers, executor: TPExecutor) -> None:
        self.buffers = buffers
        self.executor = executor

    def write(self, lora_slot: int, adapter) -> None:
        if not self.executor.closed:
            self.executor.send(Command.LORA_WRITE, (lora_slot, adapter))
        self.buffers.write(lora_slot, adapter)

    def clear(self, lora_slot: int) -> None:
        if not self.executor.closed:
            self.executor.send(Command.LORA_CLEAR, lora_slot)
        self.buffers.clear(lora_slot)

    def __getattr__(self, name: str):
        return getattr(self.buffers, name)

