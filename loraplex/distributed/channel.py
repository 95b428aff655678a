"""The control channel: how rank 0 tells the tensor-parallel workers what to run next.

Rank 0 sends one command per model call (a forward, a logits computation, a decode-graph
step, a LoRA slot write or clear, shutdown); every worker receives it and runs the same call
on its own shard, so the collectives inside the model line up rank by rank.

A message is pickled and sent with ``torch.distributed`` broadcasts over a gloo group of its
own (CPU memory, also next to NCCL on CUDA, and with no timeout: a worker may wait for its
next command for as long as the engine is idle). One broadcast of a fixed
``HEADER_BYTES`` buffer carries a typical message whole: a broadcast costs about the same
at 256 bytes as at 64 KiB (latency bound, ~1 ms on 2 busy cores, where
``broadcast_object_list``'s two broadcasts took ~4 ms); longer messages send the rest in a
second broadcast. Device tensors (CUDA) do not travel in the pickle: they follow it as tensor
broadcasts on the tensor-parallel group (NCCL), each worker receiving into its own device.

A dead peer makes gloo raise (``Connection closed by peer``) in whichever rank waits on it;
the executor turns that into ``TensorParallelError``.
"""

from __future__ import annotations

import dataclasses
import datetime
import pickle
from enum import IntEnum

import numpy as np
import torch
import torch.distributed as dist

from loraplex.distributed.parallel_state import tp_group
from loraplex.layers.forward_context import ForwardBatch
from loraplex.lora.batch import LoRABatchBuilder
from loraplex.ops.lora_meta import LoRABatch

HEADER_BYTES = 64 << 10
# The control group never times out: workers wait for commands while the engine is idle.
# Peer deaths are still seen at once (gloo raises on a closed connection).
_NO_TIMEOUT = datetime.timedelta(days=365)


class Command(IntEnum):
    FORWARD = 1  # (ids, positions, packed ForwardBatch) -> hidden, kept for LOGITS
    LOGITS = 2  # (hidden or LAST, packed ForwardBatch / SAME / None)
    DECODE_GRAPH = 3  # DecodeGraphs.run's host lists
    LORA_WRITE = 4  # (lora_slot, LoRAAdapter): the full adapter; each rank keeps its shard
    LORA_CLEAR = 5  # lora_slot
    SHUTDOWN = 6
    COMM_STATS = 7  # (enable_timing | None, reset): then every rank's comm_stats() gathered


LAST = "last"  # LOGITS: the hidden states the last FORWARD returned
SAME = "same"  # LOGITS: the last FORWARD's ForwardBatch (with the LoRA batch sent again)


@dataclasses.dataclass
class _DeviceTensor:
    """Stands for the ``index``-th device tensor broadcast after the message."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass
class _HostTensor:
    """A CPU tensor in the pickle as a numpy array (bfloat16 travels as its int16 bits)."""

    array: np.ndarray
    dtype: torch.dtype


def open_control_group():
    """Every rank calls this once, right after ``init_tensor_parallel``."""
    return dist.new_group(backend="gloo", timeout=_NO_TIMEOUT)


class ControlChannel:
    def __init__(self, group) -> None:
        self.group = group
        self._buf = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        self._np = self._buf.numpy()

    # -- rank 0 --------------------------------------------------------------------------------
    def send(self, command: Command, payload=None) -> None:
        device_tensors: list[torch.Tensor] = []
        body = pickle.dumps((int(command), to_wire(payload, device_tensors)), protocol=5)
        n = len(body)
        head = min(n, HEADER_BYTES - 8)
        self._np[:8] = np.frombuffer(n.to_bytes(8, "little"), dtype=np.uint8)
        self._np[8 : 8 + head] = np.frombuffer(body, dtype=np.uint8, count=head)
        dist.broadcast(self._buf, src=0, group=self.group)
        if n > head:
            dist.broadcast(torch.frombuffer(bytearray(body[head:]), dtype=torch.uint8), src=0,
                           group=self.group)
        for t in device_tensors:
            dist.broadcast(t.contiguous(), src=0, group=tp_group())

    # -- workers -------------------------------------------------------------------------------
    def recv(self, device: torch.device) -> tuple[Command, object]:
        dist.broadcast(self._buf, src=0, group=self.group)
        n = int.from_bytes(self._np[:8].tobytes(), "little")
        head = min(n, HEADER_BYTES - 8)
        body = self._np[8 : 8 + head].tobytes()
        if n > head:
            rest = torch.empty(n - head, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)
            body += rest.numpy().tobytes()
        command, wire = pickle.loads(body)
        if command == Command.LORA_WRITE:  # adapters stay host weights (buffers.py copies)
            device = torch.device("cpu")
        received: list[torch.Tensor] = []
        payload = from_wire(wire, device, received)
        return Command(command), payload

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (every rank calls it)."""
        out: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (every rank calls it)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


def to_wire(obj, device_tensors: list[torch.Tensor]):
    """``obj`` with every tensor replaced for the trip: CPU tensors by their numpy copy (a view
    would pickle its whole storage), device tensors by a ``_DeviceTensor`` placeholder (the
    tensor itself appended to ``device_tensors``). Walks dataclasses, lists, tuples, dicts."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            t = obj.detach()
            bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
            return _HostTensor(bits.numpy().copy(), t.dtype)
        device_tensors.append(obj)
        return _DeviceTensor(len(device_tensors) - 1, tuple(obj.shape), obj.dtype)
    return _walk(obj, lambda x: to_wire(x, device_tensors))


def from_wire(obj, device: torch.device, received: list[torch.Tensor]):
    """The inverse of ``to_wire`` on a worker: tensors on ``device``; device tensors received
    from the broadcasts that follow the message, in placeholder order."""
    if isinstance(obj, _HostTensor):
        t = torch.from_numpy(obj.array)
        return (t.view(obj.dtype) if obj.dtype == torch.bfloat16 else t).to(device)
    if isinstance(obj, _DeviceTensor):
        assert obj.index == len(received), "device tensors arrive in placeholder order"
        t = torch.empty(obj.shape, dtype=obj.dtype, device=device)
        dist.broadcast(t, src=0, group=tp_group())
        received.append(t)
        return t
    return _walk(obj, lambda x: from_wire(x, device, received))


def _walk(obj, fn):
    if isinstance(obj, list):
        return [fn(x) for x in obj]
    if isinstance(obj, tuple):
        return tuple(fn(x) for x in obj)
    if isinstance(obj, dict):
        return {k: fn(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: fn(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


# -- the ForwardBatch on the wire ---------------------------------------------------------------
# Rank-local fields stay home: each rank has its own KV cache, and its own LoRA batch builder
# rebuilds the segments from their host description (the LoRABatch tensors are views of
# rank 0's reused buffers).
_LOCAL_FIELDS = ("kv_caches", "lora", "_decode_mask")


def pack_batch(batch: ForwardBatch) -> dict:
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)
              if f.name not in _LOCAL_FIELDS}
    fields["lora"] = None if batch.lora is None else lora_recipe(batch.lora)
    return fields


def unpack_batch(fields: dict, kv_caches, lora: LoRABatchBuilder | None) -> ForwardBatch:
    fields = dict(fields)
    recipe = fields.pop("lora")
    return ForwardBatch(**fields, kv_caches=kv_caches, lora=prepare_lora(lora, recipe))


def lora_recipe(batch: LoRABatch) -> tuple[list[int], list[int], bool]:
    """``(lora_slots, lengths, is_decode)`` for ``LoRABatchBuilder.prepare`` that rebuild
    ``batch``'s segments: its adapter segments (``host_segs``, no device read) with the gaps
    between them as slot -1."""
    slots: list[int] = []
    lengths: list[int] = []
    pos = 0
    for start, n, slot in batch.host_segs:
        if start > pos:
            slots.append(-1)
            lengths.append(start - pos)
        slots.append(slot)
        lengths.append(n)
        pos = start + n
    if batch.num_tokens > pos:
        slots.append(-1)
        lengths.append(batch.num_tokens - pos)
    return slots, lengths, batch.is_decode


def prepare_lora(builder: LoRABatchBuilder | None, recipe) -> LoRABatch | None:
    if recipe is None:
        return None
    assert builder is not None, "a LoRA batch was sent to a rank without LoRA buffers"
    slots, lengths, is_decode = recipe
    return builder.prepare(slots, lengths, is_decode=is_decode)
