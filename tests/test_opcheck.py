"""torch.library.opcheck on every op of the kernel backend, over each op's registered samples.

Samples are generated inside a 1-rank gloo process group so that fused collective ops run for real.
"""

import contextlib
import socket

import pytest
import torch
import torch.distributed as dist

from fusionpasses.kernels.library import NAMESPACE, registered_opcheck_samples
from tests.opcheck_utils import run_opcheck

OPS = {name: (op, samples) for name, op, samples in registered_opcheck_samples()}


@contextlib.contextmanager
def single_rank_gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_every_op_has_samples():
    ns = getattr(torch.ops, NAMESPACE)
    defined = {
        f"{NAMESPACE}::{name}"
        for name in dir(ns)
        if isinstance(getattr(ns, name, None), torch._ops.OpOverloadPacket)
    }
    missing = sorted(defined - set(OPS))
    assert not missing, f"ops without opcheck samples: {missing}"


@pytest.mark.parametrize("name", sorted(OPS))
def test_opcheck(name):
    op, samples = OPS[name]
    with single_rank_gloo():
        cases = list(samples())
        assert cases, f"{name} registered no samples"
        for sample in cases:
            run_opcheck(op, sample)
