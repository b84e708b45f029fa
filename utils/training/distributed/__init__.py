"""Processes: torchrun/DDP helpers (processes.py), FSDP2 sharding (fsdp.py), the heartbeat watch that names a
stopped process (watch.py)."""
from .distributed_settings import DistributedSettings
from .fsdp import (check_precision, gathered_state_dict, is_sharded, local_weights, local_weights_of,
                   replicated_value, require_launch, restore_weights, set_gradient_sync, shard_model)
from .processes import (DistContext, all_gather_objects, all_reduce_sum, any_rank, barrier, broadcast_object,
                        launched_by_torchrun, setup_distributed, wrap_model)
from .watch import ProcessStalledError, ProcessWatch, group_timeout_s

__all__ = ["DistContext", "DistributedSettings", "ProcessStalledError", "ProcessWatch", "all_gather_objects",
           "all_reduce_sum", "any_rank", "barrier", "broadcast_object", "check_precision", "gathered_state_dict",
           "group_timeout_s", "is_sharded", "launched_by_torchrun", "local_weights", "local_weights_of",
           "replicated_value", "require_launch", "restore_weights", "set_gradient_sync", "setup_distributed",
           "shard_model", "wrap_model"]
