"""The foundation: config validation, pass manager order and cache key, harness helpers, packaging."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import fusionpasses
from fusionpasses import FusionConfig, PassManager, SPThreshold
from fusionpasses.passes import PASS_ORDER
from tests.distributed_utils import run_gloo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(symm_mem="maybe"),
        dict(async_tp_gating="sometimes"),
        dict(async_tp_min_speedup=0),
        dict(token_range=(0, 10)),
        dict(token_range=(10, 5)),
        dict(sp_min_tokens=-1),
        dict(device_capability=(9,)),
        dict(group_names=("tp", 3)),
        dict(sp_thresholds=((9, 8192),)),
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        FusionConfig(**bad)


def test_config_is_frozen_and_every_field_documented():
    cfg = FusionConfig()
    with pytest.raises(AttributeError):
        cfg.async_tp = True  # type: ignore[misc]
    source = open(os.path.join(REPO, "fusionpasses", "config.py")).read()
    for name in FusionConfig.__dataclass_fields__:
        # Each field is followed by its docstring in the class body.
        assert f"    {name}:" in source
        after = source.split(f"    {name}:", 1)[1].split("\n", 2)[1].strip()
        assert after.startswith('"""'), f"field {name} has no docstring"


def test_every_pass_switch_is_a_config_field():
    for switch, _, _ in PASS_ORDER:
        assert isinstance(getattr(FusionConfig(), switch), bool)


# ---- pass manager -------------------------------------------------------------------------


def test_uuid_changes_with_every_config_field_and_is_computed_once():
    base = PassManager(FusionConfig())
    changed = {
        "async_tp": True,
        "sequence_parallel": True,
        "group_names": ("tp",),
        "symm_mem": "assume",
        "token_range": (16, 4096),
        "async_tp_gating": "always",
        "async_tp_min_speedup": 1.2,
        "link_gbps": 300.0,
        "sp_thresholds": ((9, SPThreshold(4096, 4.0)),),
        "sp_min_tokens": 64,
        "device_capability": (10, 0),
        "dump_dir": "/tmp/x",
        "record_graphs": True,
        "extra": (("k", 1),),
    }
    uuids = {base.uuid()}
    for field, value in changed.items():
        uuids.add(PassManager(FusionConfig(**{field: value})).uuid())
    assert len(uuids) == len(changed) + 1
    assert PassManager(FusionConfig()).uuid() == base.uuid()
    assert base._uuid is not None and base.uuid() is base.uuid()


def test_uuid_changes_with_torch_version(monkeypatch):
    before = PassManager(FusionConfig()).uuid()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert PassManager(FusionConfig()).uuid() != before


def test_uuid_covers_pass_and_kernel_sources():
    from fusionpasses.pass_manager import _source_files

    names = {os.path.relpath(str(p), REPO) for p in _source_files()}
    assert "fusionpasses/pass_manager.py" in names
    assert "kernels/bmm_fp8.py" in names
    for _, module, _ in PASS_ORDER:
        if os.path.exists(os.path.join(REPO, "fusionpasses", "passes", f"{module}.py")):
            assert f"fusionpasses/passes/{module}.py" in names


def test_compile_options_installs_the_pass_manager_and_passes_through():
    opts = fusionpasses.compile_options(FusionConfig(), max_autotune=False)
    assert isinstance(opts["post_grad_custom_post_pass"], PassManager)
    assert opts["max_autotune"] is False


def test_pass_manager_runs_inside_torch_compile_and_graphs_are_cached_by_uuid(tmp_path):
    # A compile with the manager installed must keep using the FX graph cache (a pass without a
    # uuid would bypass it) and produce the eager result.
    pm = PassManager(FusionConfig(dump_dir=str(tmp_path)))

    def f(x):
        return torch.relu(x) * 2

    x = torch.randn(8, 8)
    with torch._inductor.config.patch(fx_graph_cache=True):
        torch._dynamo.reset()
        out = torch.compile(f, options={"post_grad_custom_post_pass": pm})(x)
    torch.testing.assert_close(out, f(x))


def test_import_does_not_touch_global_torch_config():
    code = textwrap.dedent(
        """
        import torch, torch._inductor.config as ic, torch._dynamo.config as dc
        before = (ic.save_config_portable(), dc.save_config_portable())
        import fusionpasses, fusionpasses.kernels
        from fusionpasses import PassManager, FusionConfig
        PassManager(FusionConfig(async_tp=False))
        after = (ic.save_config_portable(), dc.save_config_portable())
        assert before == after, [k for k in before[0] if before[0][k] != after[0].get(k)]
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_kernels_is_not_a_top_level_module():
    code = (
        "import importlib.util, fusionpasses.kernels as k;"
        "spec = importlib.util.find_spec('kernels');"
        "assert spec is None or 'fusionpasses' not in (spec.origin or ''), spec;"
        "assert k.__name__ == 'fusionpasses.kernels'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
    # From the repo root the folder is on sys.path; importing it under the wrong name is refused loudly.
    res = subprocess.run([sys.executable, "-c", "import kernels"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode != 0 and "fusionpasses.kernels" in res.stderr


# ---- harness helpers ------------------------------------------------------------------------


def test_fake_pg_traces_collectives(fake_pg):
    ws = dist.get_world_size()
    x = torch.ones(4, 3)
    out = funcol.all_gather_tensor(x, 0, fake_pg)
    assert out.shape == (4 * ws, 3)
    rs = funcol.reduce_scatter_tensor(torch.ones(4 * ws, 3), "sum", 0, fake_pg)
    assert rs.shape == (4, 3)


def _gloo_sum_body(rank: int, world_size: int, scale: float) -> None:
    x = torch.full((3,), float(rank + 1)) * scale
    out = funcol.all_reduce(x, "sum", dist.group.WORLD)
    expected = scale * world_size * (world_size + 1) / 2
    torch.testing.assert_close(out, torch.full((3,), expected))


def _gloo_failing_body(rank: int, world_size: int) -> None:
    if rank == 1:
        raise AssertionError("rank 1 saw a wrong value")


@pytest.mark.gloo
def test_run_gloo_moves_real_data():
    run_gloo(_gloo_sum_body, 0.5, world_size=2)


@pytest.mark.gloo
def test_run_gloo_reports_a_failing_rank():
    with pytest.raises(Exception, match="rank 1 saw a wrong value"):
        run_gloo(_gloo_failing_body, world_size=2)


@pytest.mark.multi_gpu(2, exact=False)
def test_torchrun_nccl_group_all_reduces(nccl_group):
    rank, ws = dist.get_rank(), dist.get_world_size()
    x = torch.full((4,), float(rank + 1), device="cuda")
    out = funcol.all_reduce(x, "sum", nccl_group)
    torch.testing.assert_close(out, torch.full((4,), ws * (ws + 1) / 2, device="cuda"))
