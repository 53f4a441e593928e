"""Debug switches read from the environment. The only place fusionpasses reads environment variables.

They are read when a pass manager is built, never at import, and they only add output: no switch
changes what a pass rewrites.
"""

from __future__ import annotations

import os


def dump_dir() -> str | None:
    """FUSIONPASSES_DUMP_DIR: write every pass's graph before and after to this directory."""
    return os.environ.get("FUSIONPASSES_DUMP_DIR") or None
