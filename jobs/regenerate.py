"""Ray job entry point: relabel what changed (teachers, inputs) and move the latest refs.

    ray job submit --working-dir . -- python jobs/regenerate.py jobs/configs/digits.yaml --set ray.address=auto
    kdpipe submit regenerate jobs/configs/digits.yaml --wait        # the same, through kdpipe
Extra arguments go to `kdpipe regenerate` (e.g. --dry-run, --every 6h).
"""

import sys

from kdpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["regenerate", *sys.argv[1:]]))
