"""Ray job entry point: label a dataset with every configured teacher.

    ray job submit --working-dir . -- python jobs/generate.py jobs/configs/digits.yaml --set ray.address=auto
"""

import sys

from kdpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
