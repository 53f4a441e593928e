"""fusionpasses: torch.compile graph passes for tensor-parallel LLMs, with a bundled kernel backend.

    import fusionpasses
    cfg = fusionpasses.FusionConfig(sequence_parallel=True, async_tp=True)
    model = torch.compile(model, options=fusionpasses.compile_options(cfg))

Importing fusionpasses changes no global torch setting; the passes run only where their
PassManager is installed through the compile options.
"""

from .config import FusionConfig, SPThreshold
from .pass_manager import PassManager, compile_options

__version__ = "0.1.0"

__all__ = ["FusionConfig", "SPThreshold", "PassManager", "compile_options", "__version__"]
