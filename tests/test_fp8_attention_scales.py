"""FP8 attention scales: static JSON files, the dynamic amax history, saving on wrap, the entry point."""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo

import fusionpasses.kernels.fp8_attention as fa
from fusionpasses.fp8_attention_scales import (
    DynamicFP8AttentionScales,
    QKVScales,
    StaticFP8AttentionScales,
    fp8_attention_scales,
    fp8_vit_attention,
    load_fp8_attention_scales,
    parse_fp8_attention_scales,
)
from fusionpasses.kernels.qkv_fp8_quant import reference_qkv_fp8_quant

# ---------------------------------------------------------------------------------------------
# static scales
# ---------------------------------------------------------------------------------------------


def test_parse_flat_nested_and_suffixed_keys():
    flat = {
        "blocks.0.attn": {"q": 0.5, "k": 0.25, "v": 2},
        "blocks.1.attn": {"q_scale": 1.0, "k_scale": 3.0, "v_scale": 0.125},
    }
    expected = {"blocks.0.attn": QKVScales(0.5, 0.25, 2.0), "blocks.1.attn": QKVScales(1.0, 3.0, 0.125)}
    assert parse_fp8_attention_scales(flat) == expected
    assert parse_fp8_attention_scales({"format": "x", "margin": 1.5, "layers": flat}) == expected
    assert parse_fp8_attention_scales({"l": {"q": 1.0, "q_scale": 1.0, "k": 1, "v": 1}}) == {
        "l": QKVScales(1.0, 1.0, 1.0)
    }


@pytest.mark.parametrize(
    "data,message",
    [
        ({"blocks.3.attn": {"q": 1.0, "k": 1.0}}, "layer 'blocks.3.attn' has no 'v'"),
        ({"blocks.3.attn": {"q": 1.0, "k": 0.0, "v": 1.0}}, "layer 'blocks.3.attn': the k scale must be a positive"),
        ({"blocks.3.attn": {"q": -2.0, "k": 1.0, "v": 1.0}}, "layer 'blocks.3.attn': the q scale"),
        ({"layers": {"blocks.3.attn": {"q": float("nan"), "k": 1.0, "v": 1.0}}}, "layer 'blocks.3.attn': the q scale"),
        ({"blocks.3.attn": {"q": "0.5", "k": 1.0, "v": 1.0}}, "layer 'blocks.3.attn': the q scale"),
        ({"blocks.3.attn": {"q": True, "k": 1.0, "v": 1.0}}, "layer 'blocks.3.attn': the q scale"),
        (
            {"blocks.3.attn": {"q": 1.0, "q_scale": 2.0, "k": 1.0, "v": 1.0}},
            "layer 'blocks.3.attn' gives two different q",
        ),
        ({"blocks.3.attn": [1.0, 1.0, 1.0]}, "layer 'blocks.3.attn' must map to an object"),
        ({}, "no layers"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_parse_errors_name_the_layer(data, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_fp8_attention_scales(data, source="scales.json")


def test_static_scales_from_a_file(tmp_path):
    path = tmp_path / "scales.json"
    path.write_text(json.dumps({"layers": {"enc.0": {"q": 0.5, "k": 0.25, "v": 2.0}}}))
    scales = fp8_attention_scales(path)
    assert isinstance(scales, StaticFP8AttentionScales)
    x = torch.randn(3, 2, 16)
    q, k, v = scales.qkv_scales("enc.0", x, x, x)
    for t, expected in ((q, 0.5), (k, 0.25), (v, 2.0)):
        assert t.dtype == torch.float32 and t.shape == (1,) and t.item() == expected
    with pytest.raises(KeyError, match="no FP8 attention scales for layer 'enc.7'"):
        scales.qkv_scales("enc.7", x, x, x)


def test_static_and_save_path_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="save_path applies to dynamic scales"):
        fp8_attention_scales(tmp_path / "a.json", save_path=tmp_path / "b.json")


# ---------------------------------------------------------------------------------------------
# dynamic scales
# ---------------------------------------------------------------------------------------------


def _step_tensors(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q/K/V whose amax is known: a spike of (step % 7 + 1) * {1, 2, 3} in random small values."""
    g = torch.Generator().manual_seed(step)
    out = []
    for factor in (1.0, 2.0, 3.0):
        qkv = torch.rand(6, 3, 2, 20, generator=g) - 0.5  # strided views, like a fused projection
        qkv[step % 6, 0, 1, 3] = -(step % 7 + 1) * factor
        out.append(qkv[:, 0].to(torch.bfloat16))
    return tuple(out)


def test_dynamic_scale_is_the_max_of_the_last_16_amaxes():
    scales = fp8_attention_scales()
    assert isinstance(scales, DynamicFP8AttentionScales)
    amaxes = []
    for step in range(40):
        q, k, v = _step_tensors(step)
        amaxes.append((step % 7 + 1) * torch.tensor([1.0, 2.0, 3.0]))
        got = torch.cat(scales.qkv_scales("enc.0", q, k, v))
        expected = torch.stack(amaxes[-16:]).amax(dim=0) / 448.0
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_dynamic_scales_never_saturate_the_current_step():
    scales = DynamicFP8AttentionScales(history_len=4)
    for step in range(6):
        x = torch.randn(5, 2, 16) * 10 ** (step - 2)
        q_scale, _, _ = scales.qkv_scales("enc.0", x, x, x)
        assert (x.abs().amax() / q_scale).item() <= 448.0
        assert reference_qkv_fp8_quant(x, q_scale).float().abs().max() <= 448


def test_zero_and_non_finite_inputs():
    scales = DynamicFP8AttentionScales(history_len=3)
    zero = torch.zeros(4, 2, 16)
    q_scale, _, _ = scales.qkv_scales("enc.0", zero, zero, zero)
    assert q_scale.item() > 0 and torch.all(reference_qkv_fp8_quant(zero, q_scale).float() == 0)
    x = torch.randn(4, 2, 16)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    bad[1, 0, 0] = float("inf")
    q_scale, _, _ = scales.qkv_scales("enc.0", bad, x, x)
    assert torch.isfinite(q_scale).all() and q_scale.item() > 0
    # the bad step is recorded as 0, so the next scale is the next input's own
    y = torch.randn(4, 2, 16)
    q_scale, _, _ = scales.qkv_scales("enc.0", y, y, y)
    torch.testing.assert_close(q_scale, (y.abs().amax() / 448).reshape(1), atol=0, rtol=0)


def test_layers_are_independent():
    scales = DynamicFP8AttentionScales()
    small, large = torch.ones(2, 1, 16), torch.full((2, 1, 16), 100.0)
    a = scales.qkv_scales("enc.0", small, small, small)
    b = scales.qkv_scales("enc.1", large, large, large)
    assert a[0].item() == pytest.approx(1 / 448) and b[0].item() == pytest.approx(100 / 448)


def test_save_once_when_the_first_history_wraps_and_round_trip(tmp_path):
    path = tmp_path / "calib" / "vit_scales.json"
    scales = fp8_attention_scales(save_path=path, save_margin=1.25)
    for step in range(15):
        for layer in ("enc.0", "enc.1"):
            scales.qkv_scales(layer, *_step_tensors(step + (layer == "enc.1")))
    assert not path.exists(), "saved before any history wrapped"
    scales.qkv_scales("enc.0", *_step_tensors(15))  # enc.0's 16th update: its history wraps
    assert path.exists()
    saved = json.loads(path.read_text())
    assert saved["margin"] == 1.25 and set(saved["layers"]) == {"enc.0", "enc.1"}

    current = scales.current_scales()
    loaded = load_fp8_attention_scales(path)
    for layer in ("enc.0", "enc.1"):
        for t in ("q", "k", "v"):
            assert getattr(loaded[layer], t) == getattr(current[layer], t) * 1.25
    static = StaticFP8AttentionScales.from_json(path)
    x = torch.randn(2, 1, 20)
    dynamic_now = [s * 1.25 for s in scales.qkv_scales("enc.1", *_step_tensors(15))]
    for got, want in zip(static.qkv_scales("enc.1", x, x, x), dynamic_now):
        torch.testing.assert_close(got, want, atol=0, rtol=1e-7)

    path.unlink()
    for step in range(40):
        scales.qkv_scales("enc.0", *_step_tensors(step))
    assert not path.exists(), "the scales are saved once per process"


def test_dynamic_scales_compile_without_graph_breaks_or_recompiles():
    """The update is device work only: after the first step has created the layer's history, a
    compiled step neither breaks the graph (no .item()) nor recompiles as the history moves."""
    compiled_scales, eager_scales = DynamicFP8AttentionScales(), DynamicFP8AttentionScales()

    def step(scales, q, k, v):
        s = scales.qkv_scales("enc.0", q, k, v)
        return torch.ops.fusionpasses.qkv_fp8_quant(q, s[0]), s

    step(compiled_scales, *_step_tensors(0))
    step(eager_scales, *_step_tensors(0))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(1, 20):
            out, s = compiled(compiled_scales, *_step_tensors(i))
            ref_out, ref_s = step(eager_scales, *_step_tensors(i))
            assert torch.equal(out.view(torch.uint8), ref_out.view(torch.uint8))
            assert all(torch.equal(a, b) for a, b in zip(s, ref_s))
    torch._dynamo.reset()


def test_dynamic_scales_argument_checks():
    with pytest.raises(ValueError, match="history_len"):
        DynamicFP8AttentionScales(history_len=0)
    with pytest.raises(ValueError, match="save_margin"):
        DynamicFP8AttentionScales(save_margin=0.0)
    with pytest.raises(RuntimeError, match="no save_path"):
        DynamicFP8AttentionScales().save()


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------


def _packed(lengths, heads=2, head_dim=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, generator=g).to(torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2], cu


def test_entry_point_below_the_gate_runs_bf16_attention():
    q, k, v, cu = _packed([5, 9])
    scales = DynamicFP8AttentionScales()
    out = fp8_vit_attention(q, k, v, cu, 9, layer="enc.0", scales=scales, min_fp8_seqlen=10)
    torch.testing.assert_close(out, fa.varlen_attention(q, k, v, cu, 9), atol=0, rtol=0)
    assert scales.history == {}, "no FP8 step, no amax recorded"


def test_entry_point_above_the_gate_quantizes_and_attends_in_fp8():
    q, k, v, cu = _packed([5, 9])
    scales = DynamicFP8AttentionScales()
    out = fp8_vit_attention(q, k, v, cu, 9, layer="enc.0", scales=scales, min_fp8_seqlen=9)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    s = list(DynamicFP8AttentionScales().qkv_scales("enc.0", q, k, v))
    fp8 = [reference_qkv_fp8_quant(t, sc) for t, sc in zip((q, k, v), s)]
    expected = fa.reference_fp8_attention(*fp8, *s, cu, 9, 72, None, torch.bfloat16)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # and close to bf16 attention: FP8 quantization error only
    torch.testing.assert_close(out.float(), fa.varlen_attention(q, k, v, cu, 9).float(), atol=0.1, rtol=0.1)
