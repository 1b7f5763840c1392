"""Processes: detecting the launch (torchrun, Slurm), the process group, DDP helpers.

* :mod:`nnh.distributed.context`: launch detection, process-group set-up and teardown, and
  the few collectives the shell uses (:class:`DistContext`);
* :mod:`nnh.distributed.ddp`: DistributedSampler padding, ordered prediction gathering.
* :mod:`nnh.distributed.async_group`: the gloo group of background sharded saves, torn down
  at exit before the default group.

Example:
    >>> from nnh.distributed import detect_env
    >>> detect_env({"RANK": "0", "WORLD_SIZE": "2"}).world_size
    2
"""

from nnh.distributed.context import (
    DEFAULT_DIST_TIMEOUT_S,
    DistContext,
    DistributedEnv,
    detect_env,
    first_slurm_host,
    setup_distributed,
)
from nnh.distributed.ddp import (
    ShardCounter,
    gather_predictions,
    real_samples,
    sharded_eval_loader,
    trim_batch,
)

__all__ = [
    "DEFAULT_DIST_TIMEOUT_S",
    "DistContext",
    "DistributedEnv",
    "ShardCounter",
    "detect_env",
    "first_slurm_host",
    "gather_predictions",
    "real_samples",
    "setup_distributed",
    "sharded_eval_loader",
    "trim_batch",
]
