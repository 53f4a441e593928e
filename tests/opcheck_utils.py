"""run_opcheck: torch.library.opcheck for one sample, with fp8 inputs handled.

opcheck's schema test compares inputs before and after with ``allclose``, which torch has no CPU
kernel for on fp8 dtypes. For samples with fp8 tensors we run the other opcheck tests and check
ourselves, bitwise through uint8 views, that no input the schema does not declare mutable changed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from fusionpasses.kernels.library import FP8_DTYPES, OpSample

ALL_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _tensors(sample: OpSample) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves((sample.args, sample.kwargs)) if isinstance(t, torch.Tensor)]


def _mutable_arg_names(op: Any) -> set[str]:
    schema = op._opoverload._schema if hasattr(op, "_opoverload") else op._schema
    return {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def run_opcheck(op: Any, sample: OpSample) -> None:
    has_fp8 = any(t.dtype in FP8_DTYPES for t in _tensors(sample))
    if not has_fp8:
        torch.library.opcheck(op, sample.args, sample.kwargs, test_utils=ALL_TESTS)
        return
    torch.library.opcheck(op, sample.args, sample.kwargs, test_utils=ALL_TESTS[1:])
    schema = op._opoverload._schema if hasattr(op, "_opoverload") else op._schema
    mutable = _mutable_arg_names(op)
    bound = dict(zip([a.name for a in schema.arguments], sample.args))
    bound.update(sample.kwargs)
    before = {
        name: v.detach().clone() for name, v in bound.items() if isinstance(v, torch.Tensor) and name not in mutable
    }
    op(*sample.args, **sample.kwargs)
    for name, old in before.items():
        new = bound[name]
        assert torch.equal(old.view(torch.uint8) if old.dtype in FP8_DTYPES else old,
                           new.view(torch.uint8) if new.dtype in FP8_DTYPES else new), (
            f"{op}: input {name!r} was mutated but the schema does not declare it mutable"
        )
