"""Ray job entry point for training; the same as `raymoe train`.

    ray job submit --working-dir . -- python jobs/train.py jobs/configs/demo.yaml [--set key=value ...]

Inside a job, Ray is already running: `run_training` connects to it instead of starting one.
"""

import os
import sys

if __name__ == "__main__":
    try:
        import raymoe  # noqa: F401  (installed: pip install -e . or the cluster's setup commands)
    except ImportError:
        # Not installed here: use the uploaded working dir's copy (platform/ is a source root).
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))
    from raymoe.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
