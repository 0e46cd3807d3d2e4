"""`ray job submit --working-dir . -- python -m ray_jobs.batch_caption --model DIR --input SRC --output DIR [...]`

Thin entrypoint over `af3dist caption-batch`; joins the cluster the job runs on, or starts a local Ray instance.
Rerunning with the same --output resumes: ids already written are skipped (`--retry-errors` also recaptions
ids whose stored error is transient). A run holds the output folder's lock: a second run on it exits with 3.
"""

import sys

from af3dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["caption-batch", *sys.argv[1:]]))
