"""The largest step the engine will run, on dummy tokens, for sizing the KV cache
(``sizing.measure_peak`` times it; see ``sizing.py`` for what is measured)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from loraplex.config import SchedulerConfig
from loraplex.kvcache.sizing import profile_lengths
from loraplex.layers.forward_context import ForwardBatch, forward_context
from loraplex.layers.prefill_groups import plan_prefill
from loraplex.lora.layers import logits_read_lora


def largest_step(model: torch.nn.Module, sched: SchedulerConfig, lora_manager,
                 num_slots: int, device: torch.device) -> Callable[[], None]:
    """A closure running: a prefill of ``profile_lengths(...)`` dummy sequences (spread over
    ``num_slots`` adapter slots when ``num_slots > 0``, so the LoRA path and its buffers are
    live), the logits of each sequence's last token, then ``[max_num_seqs, vocab]`` logits
    with a temperature softmax and a full sort, as a top-p sampler does on the device.
    No KV cache is written (``slot_mapping=None``)."""
    lengths = profile_lengths(sched.max_num_batched_tokens, sched.max_model_len)

    @torch.inference_mode()
    def run() -> None:
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        ids = torch.zeros(cu[-1], dtype=torch.int64, device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        use_lora = lora_manager is not None and num_slots > 0
        logits_lora = use_lora and logits_read_lora(model)  # else the logits read no batch
        slots = sorted(i % num_slots for i in range(len(lengths)))  # per sequence

        def logits_of(hidden: torch.Tensor, seq_index: list[int]) -> torch.Tensor:
            # last tokens of these sequences, under the rows' own LoRA batch as the runner
            # computes them (lm_head LoRA reads it)
            rows = [slots[i] for i in seq_index]
            lora = lora_manager.prepare(rows, [1] * len(rows)) if logits_lora else None
            with forward_context(ForwardBatch(is_prefill=False, num_tokens=len(rows),
                                              slot_mapping=None, lora=lora)):
                return model.compute_logits(hidden[last[torch.tensor(seq_index, device=device)]])

        batch = ForwardBatch(is_prefill=True, num_tokens=cu[-1], cu_seqlens=cu,
                             prefill_groups=plan_prefill(cu, device), slot_mapping=None,
                             lora=lora_manager.prepare(slots, lengths) if use_lora else None)
        last = torch.tensor(cu[1:], device=device) - 1
        with forward_context(batch):
            hidden = model(ids, positions)
        del batch
        logits = logits_of(hidden, list(range(len(lengths))))
        del logits
        # a decode step's logits: max_num_seqs rows (repeats of the last hidden states)
        logits = logits_of(hidden, sorted(i % len(lengths) for i in range(sched.max_num_seqs)))
        del hidden
        probs = torch.softmax(logits / 0.8, dim=-1)
        probs.sort(dim=-1, descending=True)

    return run
