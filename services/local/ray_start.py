"""Start a local Ray cluster, retrying the start a loaded machine can miss.

Ray 2.x gives a new node's raylet a fixed 30 s to register with the GCS
(`ray/_private/node.py`, not configurable) and otherwise raises "The current node timed out
during startup". On 2 cores shared with a training run that happens; the processes of the
failed start are shut down and a second start, with the machine no less busy, gets through.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = "timed out during startup"


def init_local_ray(attempts: int = 3, **init_args: Any) -> None:
    """`ray.init(**init_args)`, started again (after `ray.shutdown()`) when the node timed out
    during startup, up to `attempts` starts; any other error, or the last timeout, is raised."""
    import ray

    if attempts < 1:
        raise ValueError(f"attempts: expected >= 1, got {attempts!r}")
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**init_args)
            return
        except Exception as exc:  # Ray raises a bare Exception for this
            if STARTUP_TIMEOUT not in str(exc) or attempt == attempts:
                raise
            logger.warning(
                "ray: the local node timed out during startup (try %d of %d); starting again", attempt, attempts
            )
            ray.shutdown()
