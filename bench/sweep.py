"""Fault sweep of an active-active pair (see bench/README.md, "Fault sweep").

    .venv/bin/python bench/sweep.py --seeds 50 --duration 45
    .venv/bin/python bench/sweep.py --seed 17 --duration 45     # rerun one seed

Needs root (ip netns) and the system python's libnbd bindings (python3-libnbd).
The sweep itself lives in tests/sweep (its pytest file runs a few short seeds).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

from sweep.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
