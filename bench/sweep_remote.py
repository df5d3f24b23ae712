"""Three-site fault sweep: async remote copy from an active-active pair to a far site
(see bench/README.md, "Three-site fault sweep", and tests/sweep/remote.py).

    .venv/bin/python bench/sweep_remote.py --seeds 10 --duration 30
    .venv/bin/python bench/sweep_remote.py --seed 4 --duration 30      # replay one seed
    .venv/bin/python bench/sweep_remote.py --plan --seeds 5            # schedules only

Needs root (ip netns) and the system python's libnbd bindings (python3-libnbd).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

from sweep.remote import main

if __name__ == "__main__":
    sys.exit(main())
