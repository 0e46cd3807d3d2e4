"""`ray job submit -- python -m ray_jobs.data_pipeline --config <preset|yaml> [key=value ...]`

Streams a split through the data plane on the cluster and prints its summary (clips/s, drops by reason).
"""

import sys

from af3dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
