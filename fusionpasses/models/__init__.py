"""Reference models: the demo of the inspection command and the end-to-end test model of the passes."""

from .llama_tp import (
    LINEAR_KINDS,
    TPMLP,
    TPAttention,
    TPModelConfig,
    TPTransformer,
    example_input,
    reference_forward,
    rms_norm,
)

__all__ = [
    "LINEAR_KINDS",
    "TPMLP",
    "TPAttention",
    "TPModelConfig",
    "TPTransformer",
    "example_input",
    "reference_forward",
    "rms_norm",
]
