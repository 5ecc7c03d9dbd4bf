"""`ray job submit --working-dir . -- python jobs/tune.py ...`: the `anogan-ray tune` command.

Same flags, same function; inside a job Ray is reached through RAY_ADDRESS.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, installed or not

from anogan_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
