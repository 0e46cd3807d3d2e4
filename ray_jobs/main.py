"""`ray job submit --working-dir . -- python -m ray_jobs.main --config <preset|yaml> --output-dir <dir> [key=value ...]`

Thin entrypoint over `af3dist main`; joins the cluster the job runs on, or starts a local Ray instance.
"""

import sys

from af3dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["main", *sys.argv[1:]]))
