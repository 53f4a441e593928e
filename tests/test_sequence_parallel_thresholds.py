"""When sequence parallelism pays off: the per-family table, the minimum token count, overrides and
the static / dynamic token decisions, for pretend GPUs (H100, H200, B200, B300, unknown families)."""

from __future__ import annotations

import pytest
import torch

from fusionpasses import FusionConfig, SPThreshold
from fusionpasses.sp_thresholds import DEFAULT_SP_THRESHOLDS, decide_tokens, min_tokens_for, resolve_min_tokens

H100 = H200 = (9, 0)
B200, B300 = (10, 0), (10, 3)
BF16 = torch.bfloat16.itemsize


def min_tokens(capability, hidden=8192, world_size=2, itemsize=BF16, **config):
    cfg = FusionConfig(sequence_parallel=True, device_capability=capability, **config)
    return resolve_min_tokens(cfg, hidden, world_size, itemsize)


@pytest.mark.parametrize(
    "gpu,capability,world_size,expected",
    [
        ("H100", H100, 2, 1024),
        ("H100", H100, 4, 2048),
        ("H200", H200, 8, 4096),
        ("B200", B200, 2, 4096),
        ("B200", B200, 4, 8192),
        ("B300", B300, 8, 16384),
        ("B300", B300, 2, 4096),
    ],
)
def test_table_hidden_8192_bf16(gpu, capability, world_size, expected):
    result = min_tokens(capability, world_size=world_size)
    assert result.value == expected, result.source
    family = "Hopper" if capability[0] == 9 else "Blackwell"
    assert family in result.source


def test_formula_scales_with_hidden_and_dtype():
    assert min_tokens(H100, hidden=16384).value == 512
    assert min_tokens(H100, itemsize=torch.float32.itemsize).value == 512
    assert min_tokens(B200, hidden=16384, world_size=8).value == 8192
    # floor(8 MiB * 2 / (12288 * 2)) = 682.67 -> 682
    assert min_tokens(H100, hidden=12288).value == 682


def test_hidden_below_the_family_minimum_is_off():
    below, at = min_tokens(H100, hidden=8191), min_tokens(H100, hidden=8192)
    assert below.value is None and "hidden size 8191 < 8192" in below.source
    assert at.value == 1024
    assert min_tokens(B300, hidden=4096).value is None


@pytest.mark.parametrize(
    "capability,name", [((8, 9), "sm89"), ((8, 0), "sm80"), ((12, 0), "sm120"), ((11, 0), "sm110")]
)
def test_other_families_are_off(capability, name):
    result = min_tokens(capability)
    assert result.value is None
    assert f"no SP threshold for {name}" in result.source and "sp_thresholds or sp_min_tokens" in result.source


def test_no_gpu_declines_unless_min_tokens_is_set():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device_capability falls back to it")
    result = min_tokens(None)
    assert result.value is None and "no GPU" in result.source
    forced = min_tokens(None, sp_min_tokens=64)
    assert forced.value == 64 and "sp_min_tokens=64" in forced.source


def test_sp_min_tokens_overrides_table_and_hidden_minimum():
    assert min_tokens(B200, sp_min_tokens=0).value == 0
    assert min_tokens((8, 9), hidden=256, sp_min_tokens=100).value == 100


def test_sp_thresholds_override_replaces_the_table():
    table = ((8, SPThreshold(min_hidden_size=4096, min_per_gpu_mib=4.0)), (9, SPThreshold(8192, 16.0)))
    assert min_tokens((8, 9), hidden=4096, sp_thresholds=table).value == 4 * 2**20 * 2 // (4096 * 2)
    assert min_tokens(H100, sp_thresholds=table).value == 2048
    # The override is the whole table: Blackwell is not in it any more.
    assert min_tokens(B200, sp_thresholds=table).value is None


def test_default_table_is_what_the_issue_states():
    assert DEFAULT_SP_THRESHOLDS[9] == SPThreshold(8192, 8.0)
    assert DEFAULT_SP_THRESHOLDS[10] == SPThreshold(8192, 32.0)
    assert min_tokens_for(DEFAULT_SP_THRESHOLDS[10], 8192, 8, BF16) == 16384


# ---- token decisions ------------------------------------------------------------------------


def decide(static=None, hint=None, token_range=None, value=1024):
    cfg = FusionConfig(sequence_parallel=True, token_range=token_range)
    needed = resolve_min_tokens(FusionConfig(sp_min_tokens=value), 8192, 2, BF16)
    return decide_tokens(cfg, needed, static, hint)


def test_static_token_count():
    assert decide(static=1024).applies and decide(static=4096).applies
    below = decide(static=1023)
    assert not below.applies and "1023 tokens < min_tokens 1024" in below.reason


def test_dynamic_token_count_uses_the_declared_range():
    inside = decide(hint=8, token_range=(1024, 8192))
    assert inside.applies and "token_range (1024, 8192)" in inside.reason
    straddling = decide(hint=4096, token_range=(512, 8192))
    assert not straddling.applies and "reaches below min_tokens 1024" in straddling.reason


def test_dynamic_token_count_without_a_range_uses_the_hint_and_says_so():
    above = decide(hint=2048)
    assert above.applies and "size hint 2048" in above.reason and "no token_range" in above.reason
    below = decide(hint=512)
    assert not below.applies and "size hint 512 < min_tokens 1024" in below.reason


def test_no_threshold_is_a_decline_with_its_reason():
    cfg = FusionConfig(sequence_parallel=True, device_capability=(8, 9))
    decision = decide_tokens(cfg, resolve_min_tokens(cfg, 8192, 2, BF16), 100000)
    assert not decision.applies and "no SP threshold for sm89" in decision.reason
