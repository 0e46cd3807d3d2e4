"""`ray job submit --working-dir . -- python -m ray_jobs.finetune --config <preset|yaml> --output-dir <dir> [key=value ...]`

Thin entrypoint over `af3dist train`; joins the cluster the job runs on, or starts a local Ray instance.
"""

import sys

from af3dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
