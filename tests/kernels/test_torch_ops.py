"""The custom ops: they run the kernels, declare their cache mutation, have shape-correct fakes, and
a LLaMA attention block built from them matches the same block written with the references."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from llava_edge.kernels import torch_ops  # noqa: E402,F401  (registers torch.ops.llava_edge.*)
from llava_edge.kernels.reference import (  # noqa: E402
    decode_attention_ref,
    int4_matmul_ref,
    pack_int4,
    prefill_attention_ref,
    rope_cos_sin,
)


class _Attn(torch.nn.Module):
    def __init__(self, E: int, H: int, kvH: int, D: int) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(E, H * D, bias=False)
        self.k_proj = torch.nn.Linear(E, kvH * D, bias=False)
        self.v_proj = torch.nn.Linear(E, kvH * D, bias=False)
        self.o_proj = torch.nn.Linear(H * D, E, bias=False)


def test_llama_block_prefill_then_decode_matches_reference(device) -> None:
    B, T, E, H, kvH, D, S = 2, 9, 48, 4, 2, 32, 16
    attn = _Attn(E, H, kvH, D).to(device)
    cos, sin = rope_cos_sin(S, D, device=device)
    lens = torch.tensor([9, 5], dtype=torch.int32, device=device)
    kc, vc = torch.zeros(B, kvH, S, D, device=device), torch.zeros(B, kvH, S, D, device=device)
    kr, vr = kc.clone(), vc.clone()
    x = torch.randn(B, T, E, device=device)

    def ref(h: torch.Tensor, decode: bool) -> torch.Tensor:
        n = h.shape[1]
        q = attn.q_proj(h).view(B, n, H, D)
        k = attn.k_proj(h).view(B, n, kvH, D)
        v = attn.v_proj(h).view(B, n, kvH, D)
        if decode:
            o = decode_attention_ref(q[:, 0], k[:, 0], v[:, 0], kr, vr, lens, cos, sin)[:, None]
        else:
            o = prefill_attention_ref(q, k, v, kr, vr, lens, cos, sin)
        return attn.o_proj(o.reshape(B, n, H * D))

    with torch.no_grad():
        got = torch_ops.llama_attention_forward(attn, x, kc, vc, lens, cos, sin, H, kvH, decode=False)
        expected = ref(x, decode=False)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        step = torch.randn(B, 1, E, device=device)
        got = torch_ops.llama_attention_forward(attn, step, kc, vc, lens, cos, sin, H, kvH, decode=True)
        torch.testing.assert_close(got, ref(step, decode=True), atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="one token"):
            torch_ops.llama_attention_forward(attn, x, kc, vc, lens, cos, sin, H, kvH, decode=True)
    torch.testing.assert_close(kc, kr)
    torch.testing.assert_close(vc, vr)


def test_ops_declare_cache_mutation_and_have_fakes(device) -> None:
    schema = str(torch.ops.llava_edge.decode_attention.default._schema)
    assert "Tensor(a3!) k_cache" in schema and "Tensor(a4!) v_cache" in schema
    assert "!" not in str(torch.ops.llava_edge.int4_linear.default._schema)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(2, 8, 64), torch.empty(2, 2, 64)
        cache = torch.empty(2, 2, 32, 64)
        out = torch.ops.llava_edge.decode_attention(q, k, k, cache, cache, torch.empty(2, dtype=torch.int32),
                                                    torch.empty(32, 32), torch.empty(32, 32), None, 0)
        assert out.shape == (2, 8, 64)
        y = torch.ops.llava_edge.int4_linear(torch.empty(3, 5, 128), torch.empty(24, 64, dtype=torch.uint8),
                                             torch.empty(24, 2, dtype=torch.float16), 64)
        assert y.shape == (3, 5, 24)


def test_int4_linear_op_passes_opcheck(device) -> None:
    qweight, scales = pack_int4(torch.randn(24, 128), 64)
    qweight, scales = torch.from_numpy(qweight).to(device), torch.from_numpy(scales).to(device)
    x = torch.randn(2, 3, 128, device=device)
    y = torch.ops.llava_edge.int4_linear(x, qweight, scales, 64)
    torch.testing.assert_close(y, int4_matmul_ref(x, qweight, scales, 64), atol=1e-4, rtol=1e-4)
    torch.library.opcheck(torch.ops.llava_edge.int4_linear, (x, qweight, scales, 64),
                          test_utils=("test_schema", "test_faketensor"))


def test_real_llama_decoder_on_the_kernels_generates_what_transformers_does(device) -> None:
    """The kernels inside a real HF LlamaForCausalLM forward (tiny, GQA 4/2, head_dim 32): a ragged
    batch (prompts 7 and 3, right-padded), then split-K decode steps. Every step's logits must match
    the model's own forward on the same tokens within 1e-4 (fp32), and the greedy tokens must agree."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval().to(device)
    lens = torch.tensor([7, 3], dtype=torch.int32)
    ids = torch.randint(0, 96, (2, 7))
    ids[1, 3:] = 0  # padding after the short prompt
    new, step_logits = torch_ops.llama_greedy_generate(model, ids.to(device), lens, max_new_tokens=6)
    assert new.shape == (2, 6)
    with torch.no_grad():
        for b, n in enumerate(lens.tolist()):
            seq = ids[b, :n].to(device)
            for step in range(6):
                ref = model(seq[None]).logits[0, -1]
                torch.testing.assert_close(step_logits[step][b], ref, atol=1e-4, rtol=1e-4)
                seq = torch.cat([seq, ref.argmax()[None]])
            assert new[b].tolist() == seq[n:].tolist()
