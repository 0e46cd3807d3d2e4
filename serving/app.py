"""The Serve import path `serving.app:build_app`, for `serve run`, `serve deploy` and KubeRay's RayService.

The application lives in the library (af3dist.server.app); this module only names it for Serve configs.
"""

from af3dist.server.app import build_app

__all__ = ["build_app"]
