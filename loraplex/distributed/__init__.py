"""Tensor parallelism over ``torch.distributed``: the process state (``parallel_state``), the
control channel rank 0 drives the workers through (``channel``), rank 0's side
(``executor``) and the worker processes (``worker``)."""
