"""Tensor parallelism over ``torch.distributed``: the process group and collectives
(``parallel_state``), per-rank shapes (``sharding``), the control channel rank 0 drives the
workers through (``channel``), rank 0's side (``executor``) and the worker processes
(``worker``)."""
