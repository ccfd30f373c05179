"""Alias of rectflow.training.distributed (its old name), kept so that `from rectflow import distributed` works."""
from rectflow.training.distributed import Context, all_reduce_sum, barrier, init, shutdown  # noqa: F401
