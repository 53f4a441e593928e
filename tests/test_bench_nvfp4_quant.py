"""scripts/bench_nvfp4_quant.py's load/store-only floor (Triton's CPU interpreter) and its table."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

from fusionpasses.kernels.nvfp4_quant import scale_shape

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_nvfp4_quant", ROOT / "scripts" / "bench_nvfp4_quant.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_nvfp4_quant"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_nvfp4_quant"]


@pytest.mark.parametrize(
    "m,n,width,layout", [(3, 48, 64, "linear"), (130, 1040, 1056, "swizzled"), (2, 512, 512, "linear")]
)
def test_load_store_only_writes_every_byte_of_the_quant_outputs(bench, m, n, width, layout):
    # Its time only bounds the quant kernel's if it moves the same bytes: the packed row from x's words,
    # every scale byte, padding rows and columns included.
    x = torch.randint(-(2**15), 2**15, (m, n), dtype=torch.int16).view(torch.bfloat16)
    packed, scales = bench.launch_load_store_only(x, width, layout)
    assert packed.shape == (m, width // 2) and scales.shape == scale_shape(m, width, layout)
    words = torch.nn.functional.pad(x.view(torch.int16), (0, width - n)).view(torch.int32)
    assert torch.equal(packed, ((words >> 9) & 0xFF).to(torch.uint8))  # zeros read past N: no read past the row
    block_max = words.reshape(m, width // 16, 8).amax(dim=2)
    assert torch.equal(scales[:m, : width // 16], (block_max & 0xFF).to(torch.uint8))
    assert not scales[m:].any() and not scales[:, width // 16 :].any()


def test_table_and_summary_show_the_load_store_only_floor(bench):
    row = {"M": 1024, "N": 7168, "padded_n": 7168, "quant_us": 8.0, "padded_us": 8.0, "padding_overhead": 1.0,
           "quant_pad_us": None, "speedup_vs_quant_pad": None, "padded_gbps": 2300.0, "copy_gbps": 3100.0,
           "fraction_of_copy": 0.742, "load_store_only_fraction_of_copy": 0.832}
    assert bench.format_table([row]).splitlines()[1].endswith("74% |            83%")
    assert bench.summary([row])[-1] == (
        "bandwidth at M >= 1024: worst 74% of copy (target >= 75%): MISSED "
        "(loads and stores alone on its grid: worst 83%)"
    )
