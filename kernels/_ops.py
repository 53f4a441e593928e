"""Imports every kernel file so that its ops get registered. Add one line per new kernel file."""

from . import all_gather_gemm, bmm_fp8, gemm_reduce_scatter  # noqa: F401
from . import batch_invariant_fp8_gemm  # noqa: F401
from . import qkv_fp8_quant  # noqa: F401
from . import fp8_attention  # noqa: F401
from . import nvfp4_quant  # noqa: F401
from . import block_fp8_gemm  # noqa: F401
from . import rms_norm  # noqa: F401
from . import fp8_quant  # noqa: F401
from . import rank_rows  # noqa: F401
