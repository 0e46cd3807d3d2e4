"""Joining a Ray cluster, or starting a local one, the way every af3dist entrypoint does it."""

from __future__ import annotations

import logging
import os

import ray

from af3dist.config import ConfigError, RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Join $RAY_ADDRESS or cfg.address; `auto` with no cluster found, or no address at all, starts a local
    instance.

    Inside `ray job submit` the job's driver has RAY_ADDRESS set to the cluster's GCS address (host:port) and
    inherits the node's RAY_AUTH_MODE / token, so the job joins the cluster it was submitted to, whatever the
    config says. An explicit address that cannot be reached is an error, never a silent local instance.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    if address and address.startswith(("http://", "https://")):
        raise ConfigError(f"RAY_ADDRESS / ray.address {address!r} is the Jobs API (dashboard) address: submit "
                          f"with `ray job submit -- python -m ray_jobs.<job> ...`, or set the GCS address "
                          f"(host:6379) to run the driver here")
    if address and address != "auto":
        ray.init(address=address)
        log.info("joined the Ray cluster at %s (%d nodes)", address, len([n for n in ray.nodes() if n["Alive"]]))
        return
    if address == "auto":
        try:
            ray.init(address="auto")
            return
        except ConnectionError:
            log.warning("no running Ray cluster found; starting a local Ray instance")
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=False)
