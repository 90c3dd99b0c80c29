"""Ray job entry point: a kdpipe benchmark on the cluster it runs in.

    ray job submit --working-dir . -- python jobs/benchmark.py student --repeats 3 --json
Arguments are those of `kdpipe bench` (storage, stream, student, quality, ...).
"""

import sys

from kdpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
