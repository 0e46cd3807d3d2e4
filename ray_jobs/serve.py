"""`ray job submit --working-dir . -- python -m ray_jobs.serve --model <dir> [--adapter NAME=DIR ...]`

Thin entrypoint over `af3dist serve`: deploys the Serve app on the cluster the job runs on and keeps the job
alive until it is stopped (`ray job stop`). For long-lived services prefer `serve deploy
serving/serve_config.yaml` or a RayService.
"""

import sys

from af3dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
