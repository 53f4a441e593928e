#!/usr/bin/env python3
"""Same as ``python -m fusionpasses.inspect`` (and the ``fusionpasses-inspect`` command); see docs/inspect.md.

    python scripts/inspect_graph.py --world-size 2 --passes sequence_parallel,async_tp --out inspect_out
    torchrun --nproc-per-node 2 scripts/inspect_graph.py --passes sequence_parallel,async_tp --compare
"""

import sys

from fusionpasses.inspect import main

if __name__ == "__main__":
    sys.exit(main())
