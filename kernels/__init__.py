"""fusionpasses.kernels: the bundled kernel backend (``torch.ops.fusionpasses.*``).

Importing this package registers every op. It installs as ``fusionpasses.kernels``; the top-level
name ``kernels`` belongs to an unrelated PyPI package (which transformers imports), so importing
this folder under that name is refused instead of silently shadowing it.
"""

if __name__ != "fusionpasses.kernels":
    raise ImportError(
        "fusionpasses' kernel backend must be imported as `fusionpasses.kernels` (install the project "
        "with `pip install -e .`); the top-level name `kernels` belongs to another PyPI package."
    )

from . import library  # noqa: E402,F401
from .library import NAMESPACE, KernelInputError  # noqa: E402,F401

# One import per kernel file: each registers its ops on import.
from . import _ops  # noqa: E402,F401
