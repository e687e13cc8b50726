"""Ray job entry point for a hyperparameter search; the same as `raymoe tune`.

    ray job submit --working-dir . -- python jobs/tune.py jobs/configs/tune-demo.yaml [--set key=value ...]
"""

import os
import sys

if __name__ == "__main__":
    try:
        import raymoe  # noqa: F401  (installed: pip install -e . or the cluster's setup commands)
    except ImportError:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))
    from raymoe.cli import main

    sys.exit(main(["tune", *sys.argv[1:]]))
