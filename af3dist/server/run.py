"""`af3dist serve`: deploy the Serve app on the current Ray cluster (or a local one) and stay in the
foreground until SIGINT/SIGTERM, then shut the app down cleanly."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading

from ray import serve

from af3dist.cluster import init_ray
from af3dist.config import load_config
from af3dist.server.app import build_app

log = logging.getLogger(__name__)

APP_NAME = "af3dist"


def is_loopback(host: str) -> bool:
    """Whether `host` binds to this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_forever(config: str, overrides: list[str], model: str | None, adapters: dict[str, str],
                  host: str | None = None, port: int | None = None) -> None:
    host = host or load_config(config, overrides).serve.host
    if not is_loopback(host):  # reachable from elsewhere: no key must mean `serve.api_key=none`, said on purpose
        overrides = [*overrides, "serve.require_api_key=true"]
    cfg = load_config(config, overrides)  # fail on a bad config before anything starts
    init_ray(cfg.ray)
    port = port or cfg.serve.port
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg.serve.http_request_timeout_s})
    app = build_app({"config": config, "overrides": overrides, "model": model, "adapters": adapters})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    print(f"af3dist: serving on http://{host}:{port} (OpenAI API at /v1); Ctrl-C or SIGTERM stops it",
          flush=True)
    try:
        stop.wait()
    finally:
        print("af3dist: shutting down", flush=True)
        serve.delete(APP_NAME)
        serve.shutdown()
        print("af3dist: stopped", flush=True)
