import copy

import pytest
import torch

from llava_edge.quantize.capture import EncodedSample, capture_layer_inputs
from llava_edge.quantize.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from llava_edge.quantize.rtn import rtn_quantize
from llava_edge.quantize.sequential import QuantizeLayersConfig, choose_group_size, quantize_layers


def _token_samples(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    # Zipf-ish token distribution: real text reuses a few tokens a lot.
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float)
    return [EncodedSample(torch.multinomial(probs, length, replacement=True, generator=g).unsqueeze(0), None)
            for _ in range(n)]


@pytest.fixture(scope="module")
def captured(tiny_llama):
    samples = _token_samples(14, 64, tiny_llama.config.vocab_size, seed=0)
    caps = capture_layer_inputs(tiny_llama, samples, progress=False)
    return caps[:10], caps[10:]


def test_hessian_accumulator_matches_closed_form():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    acc = HessianAccumulator(16)
    for chunk in (x[:7], x[7:150], x[150:]):
        acc.add_batch(chunk.unsqueeze(0))
    torch.testing.assert_close(acc.H, 2 * x.T @ x / 300, rtol=1e-4, atol=1e-4)
    assert acc.nsamples == 300


def test_capture_records_the_first_layer_inputs(tiny_llama, captured):
    calib, _ = captured
    assert calib[0].hidden.shape == (1, 64, 128)
    assert "position_embeddings" in calib[0].kwargs
    # replaying layer 0 + the rest reproduces the model's own final hidden state
    h = calib[0]
    with torch.no_grad():
        x = h.hidden
        for layer in tiny_llama.model.layers:
            x = layer(x, **h.kwargs)
            x = x[0] if isinstance(x, tuple) else x
        ref = tiny_llama.model(input_ids=_token_samples(14, 64, 256, seed=0)[0].input_ids).last_hidden_state
    torch.testing.assert_close(tiny_llama.model.norm(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_layer_error_clearly_below_rtn_on_real_activations(tiny_llama, captured, act_order):
    calib, holdout = captured
    model = copy.deepcopy(tiny_llama)
    cfg = QuantizeLayersConfig("gptq", GPTQConfig(bits=4, group_size=32, act_order=act_order), progress=False)
    res = quantize_layers(model, calib, holdout, cfg)
    assert len(res.quantized) == 2 * 7
    assert len(res.layer_errors) == 2
    for e in res.layer_errors:
        assert e.gptq < 0.8 * e.rtn, (e.layer, e.gptq, e.rtn)
    # the quantized model's weights are now exactly the dequantized codes
    q = res.quantized["layers.1.mlp.down_proj"]
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, q.dequantize())


def test_rtn_method_keeps_rtn_weights(tiny_llama, captured):
    calib, holdout = captured
    model = copy.deepcopy(tiny_llama)
    res = quantize_layers(model, calib, holdout, QuantizeLayersConfig("rtn", GPTQConfig(group_size=32), progress=False))
    w = tiny_llama.model.layers[0].self_attn.k_proj.weight
    assert torch.equal(res.quantized["layers.0.k_proj"].q, rtn_quantize(w, 4, 32).q)
    assert all(e.gptq is None for e in res.layer_errors)


def test_act_order_uses_static_groups_on_the_original_column_order():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(400, 128, generator=g) * torch.linspace(0.1, 10, 128)  # act-order really permutes
    acc = HessianAccumulator(128)
    acc.add_batch(x)
    res = gptq_quantize(w, acc.H, GPTQConfig(group_size=32, act_order=True))
    # static groups: scales are those of the original weight's contiguous groups (RTN's), so the
    # stored layout (contiguous groups, no g_idx) is exactly what the codes were chosen against
    assert torch.equal(res.quantized.scales, rtn_quantize(w, 4, 32).scales)
    assert torch.equal(res.quantized.dequantize(), res.weight)
    assert not torch.equal(res.quantized.q, rtn_quantize(w, 4, 32).q)


def test_damping_is_raised_when_cholesky_fails():
    h = torch.eye(64)
    h[10, 10] = -0.05  # indefinite: 0.01 * mean(diag) damping is not enough, 0.1 is
    res = gptq_quantize(torch.randn(8, 64), h, GPTQConfig(group_size=32, damp=0.01))
    assert res.damp == pytest.approx(0.1)
    with pytest.raises(RuntimeError, match="not positive definite"):
        gptq_quantize(torch.randn(8, 64), -torch.eye(64), GPTQConfig(group_size=32, max_damp_retries=1))


def test_group_size_fallback_for_indivisible_k():
    assert choose_group_size(128, 128) == 128
    assert choose_group_size(96, 64) == 32
    assert choose_group_size(40, 32) is None
