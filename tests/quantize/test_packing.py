import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from llava_edge.quantize.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from llava_edge.packing import (QuantizedLinear, dequantize_packed, pack, pack_int4_onnx, qrange,
                                            unpack)
from llava_edge.quantize.rtn import rtn_quantize


def test_int4_nibble_order_is_the_matmulnbits_contract():
    # element 2j -> low nibble, 2j+1 -> high nibble, stored as q + 8
    q = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)
    b = pack(q, 4)
    assert b.shape == (1, 2)
    assert b[0, 0] == (0 | (15 << 4)) and b[0, 1] == (8 | (7 << 4))


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    qmin, qmax = qrange(bits)
    q = torch.randint(qmin, qmax + 1, (24, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    q[0, :2] = torch.tensor([qmin, qmax])
    assert np.array_equal(unpack(pack(q, bits), bits), q.numpy())
    with pytest.raises(ValueError):
        pack(torch.full((2, 4), qmax + 1), bits)


@pytest.mark.parametrize("bits,act_order,scale_dtype", [(4, True, torch.float32), (4, False, torch.float16),
                                                         (8, True, torch.float32)])
def test_packed_gptq_weights_dequantize_exactly_to_the_algorithm_output(bits, act_order, scale_dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=g)
    x = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)
    acc = HessianAccumulator(128)
    acc.add_batch(x)
    res = gptq_quantize(w, acc.H, GPTQConfig(bits=bits, group_size=32, act_order=act_order, scale_dtype=scale_dtype))
    q = res.quantized
    stored_scales = q.scales.numpy().astype(np.float16 if scale_dtype == torch.float16 else np.float32)
    deq = dequantize_packed(q.pack(), stored_scales, bits, 32)
    assert np.array_equal(deq, res.weight.numpy())  # bit-exact, what the error feedback assumed
    qmin, qmax = qrange(bits)
    assert int(q.q.min()) >= qmin and int(q.q.max()) <= qmax


def test_onnx_int4_raw_data_matches_codes_in_onnxruntime():
    k, n, g = 64, 16, 32
    lin = rtn_quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(2)), 4, g)
    codes = lin.q.numpy().T  # [K, N]
    wq = helper.make_tensor("Wq", TensorProto.INT4, [k, n], pack_int4_onnx(codes), raw=True)
    s = numpy_helper.from_array(np.ascontiguousarray(lin.scales.numpy().T), "S")
    node = helper.make_node("DequantizeLinear", ["Wq", "S"], ["W"], axis=0, block_size=g)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("W", TensorProto.FLOAT, [k, n])],
                              initializer=[wq, s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.array_equal(out, lin.dequantize().numpy().T)


def test_rtn_is_nearest_grid_point_and_uses_the_full_code_range():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    lin = rtn_quantize(w, 4, 32)
    err = (lin.dequantize() - w).abs()
    s = lin.scales.repeat_interleave(32, dim=1)
    assert bool((err <= s / 2 + 1e-6).all())
    # each group's extreme is represented exactly by qmin or qmax
    codes = lin.q.view(32, 2, 32)
    assert bool(((codes == -8) | (codes == 7)).any(-1).all())
    assert isinstance(lin, QuantizedLinear)


def test_concat_outputs_stacks_rows_and_refuses_mismatched_parts():
    import torch

    from llava_edge.packing import QuantizedLinear, concat_outputs

    g = torch.Generator().manual_seed(0)
    q = lambda n: QuantizedLinear(torch.randint(-8, 8, (n, 64), generator=g, dtype=torch.int8),  # noqa: E731
                                  torch.rand(n, 2, generator=g), 4, 32)
    a, b = q(16), q(8)
    ab = concat_outputs([a, b])
    assert torch.equal(ab.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    with pytest.raises(ValueError):
        concat_outputs([a, QuantizedLinear(b.q, torch.rand(8, 4), 4, 16)])
    with pytest.raises(ValueError):
        concat_outputs([QuantizedLinear(a.q, a.scales, 4, 32, torch.arange(64)), b])
