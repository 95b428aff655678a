"""Tensor parallelism: the process-group state (``parallel_state``) and the per-rank sizes of a
sharded model (``sharding``)."""
