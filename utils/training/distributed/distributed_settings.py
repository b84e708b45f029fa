"""The distributed group of the settings: how processes under torchrun share the work and watch each other."""
from __future__ import annotations

from dataclasses import dataclass

from ..setting_rules import FREE, SettingsGroup, check_bool, number, setting


@dataclass
class DistributedSettings(SettingsGroup):
    # Under torchrun: shard parameters, gradients and optimizer state across the processes (FSDP2) instead of DDP.
    # Free on resume: a sharded checkpoint loads into an unsharded model and back (DCP reshards); the world-size
    # rule (sharded_checkpoint.py) decides whether the steps stay the same.
    fsdp: bool = setting(False, check=check_bool, resume=FREE, setup=True, search=True)
    # Under torchrun: a process that gives no sign of life (heartbeat) for this many minutes stops the run, named
    # with its rank and step, instead of the others waiting silently in a collective (torch's default: 30 min on
    # gloo). Also the process group's timeout when the package starts the group (watch.py).
    # Free on resume: a watch's limit, not part of what is trained.
    process_timeout_minutes: float = setting(
        10.0, check=number(0.0, low_open=True, hint=" Pass minutes as a number, e.g. process_timeout_minutes=10 "
                           "(or 0.5 for 30 seconds)."),
        resume=FREE, setup=False, search=True)
