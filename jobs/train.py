"""Ray job entry point: train a student from cached teacher labels.

    ray job submit --working-dir . -- python jobs/train.py jobs/configs/digits.yaml --set ray.address=auto
"""

import sys

from kdpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
