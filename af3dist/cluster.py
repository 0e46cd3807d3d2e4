"""Joining a Ray cluster, or starting a local one, the way every af3dist entrypoint does it."""

from __future__ import annotations

import logging
import os

import ray

from af3dist.config import ConfigError, RayConfig

log = logging.getLogger(__name__)

# Idle worker processes a node keeps (Ray's `num_workers_soft_limit`). Ray's default is the node's free CPUs:
# on a small node whose actors (training workers, Ray Data's coordinators, the error ledger) hold fractional
# CPUs, every pause of the data plane (a full prefetch window, an evaluation) leaves more idle data workers
# than that, Ray kills them after a second idle, and the next data task waits for a fresh process to import
# torch and transformers and load the processor: 13-15 s stalls. Measured on 2 cores
# (benchmarks/train_throughput.py, side by side): 13 samples/s with 37% data wait at Ray's default, 25 with
# 1% at this limit. Set on the nodes of a cluster the same way: RAY_num_workers_soft_limit in their env.
IDLE_WORKERS_KEPT = 8


def local_ray_options(num_cpus: int | None = None) -> dict:
    """ray.init keyword arguments for a local instance, as every entrypoint (and the tests) start one."""
    value = os.environ.get("RAY_num_workers_soft_limit", str(IDLE_WORKERS_KEPT))
    try:
        soft_limit = int(value)
    except ValueError:
        raise ConfigError(f"RAY_num_workers_soft_limit must be an integer, not {value!r}") from None
    return {"num_cpus": num_cpus, "include_dashboard": False,
            "_system_config": {"num_workers_soft_limit": soft_limit}}


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
    ray.init(**local_ray_options(cfg.num_cpus))
