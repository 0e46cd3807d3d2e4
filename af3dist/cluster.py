"""Joining a Ray cluster, or starting a local one, the way every af3dist entrypoint does it."""

from __future__ import annotations

import logging
import os

import ray

from af3dist.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Join cfg.address or $RAY_ADDRESS (set inside `ray job submit`); `auto` with no cluster, or no
    address at all, starts a local instance."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    if address and address != "auto":
        ray.init(address=address)
        return
    if address == "auto":
        try:
            ray.init(address="auto")
            return
        except ConnectionError:
            log.warning("no running Ray cluster found; starting a local Ray instance")
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=False)
