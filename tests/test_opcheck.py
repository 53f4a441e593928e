"""torch.library.opcheck on every op of the kernel backend, over each op's registered samples."""

import pytest

from fusionpasses.kernels.library import registered_opcheck_samples
from tests.opcheck_utils import run_opcheck

CASES = [
    pytest.param(op, sample, id=f"{name}[{sample.name or i}]")
    for name, op, samples in registered_opcheck_samples()
    for i, sample in enumerate(samples())
]


def test_every_op_has_samples():
    import torch

    from fusionpasses.kernels.library import NAMESPACE

    registered = {name for name, _, _ in registered_opcheck_samples()}
    ns = getattr(torch.ops, NAMESPACE)
    defined = {f"{NAMESPACE}::{name}" for name in dir(ns) if not name.startswith("_") and name not in ("name", "__file__")}
    missing = sorted(n for n in defined if isinstance(getattr(ns, n.split("::")[1], None), torch._ops.OpOverloadPacket)
                     and n not in registered)
    assert not missing, f"ops without opcheck samples: {missing}"


@pytest.mark.parametrize("op,sample", CASES)
def test_opcheck(op, sample):
    run_opcheck(op, sample)
