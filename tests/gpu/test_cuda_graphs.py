"""Ops that keep buffers between calls, replayed by Inductor's CUDA graph trees (one GPU).

`python -m pytest tests/gpu/test_cuda_graphs.py`. A buffer an op caches during the graph's warm-up
must not come from the graph's pool (kernels/library.py: outside_graph_pools); the two-GPU fused
collective ops are covered in test_async_tp_gpu.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.gpu

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="FlashInfer is not installed")
def test_bmm_fp8_replays_as_cuda_graph():
    from fusionpasses.kernels import bmm_fp8 as module

    g = torch.Generator(device="cuda").manual_seed(0)
    a = (torch.randn(1, 512, 1024, device="cuda", generator=g) * 2).to(FP8)
    b = (torch.randn(1, 768, 1024, device="cuda", generator=g) * 2).to(FP8).transpose(1, 2)
    scale = torch.tensor([0.03], device="cuda")

    def f(x):
        return torch.ops.fusionpasses.bmm_fp8(x, b, scale, scale, BF16, "cublas")

    cached_before = len(module._workspaces)
    torch._dynamo.reset()
    compiled = torch.compile(f, options={"triton.cudagraphs": True}, fullgraph=True, dynamic=False)
    for _ in range(4):  # warm-up, capture, replays
        torch.testing.assert_close(compiled(a).clone(), f(a))
    if module.safe_on_concurrent_streams():  # the fast path cached a workspace for the graph's stream
        assert len(module._workspaces) > cached_before
