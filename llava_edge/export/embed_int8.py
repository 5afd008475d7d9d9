"""The token embedding table in 8 bits: one GatherBlockQuantized node over uint8 rows.

Why: in an int4 CPU package the fp32 embedding table is as large as all the int4 decoder layers of a
1B model together (32000 x 2048 x 4 bytes = 262 MB), yet each step reads only the rows of the new
tokens. Stored as symmetric 8-bit codes per block of `block_size` hidden channels (one fp scale per
block, zero point 128: the same code layout as packing.py's int8) it is a quarter of that,
and onnxruntime's GatherBlockQuantized (com.microsoft) dequantizes only the gathered rows. The
rounding error is at most half a step, max|block| / 254, far below what the int4 layers add.

Graph contract: the same as the float embed graph (input_ids int64 [B,S] -> inputs_embeds [B,S,H]), so
the runtime does not know which one it holds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..onnx_io import MAX_IR_VERSION
from ..packing import pack
from .fast_decoder import rtn_codes

# ||int8 rows - float rows|| / ||float rows||, worst row: rounding to 8 bits is <= 0.4% of a block's
# largest value per element; a wrong scale or code offset is far above.
RELATIVE_TOLERANCE = 1e-2


def quantize_rows(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[V,H] float -> (uint8 codes [V,H] = q + 128, scales [V, H/block_size]): the fast decoder's
    symmetric round-to-nearest at 8 bits, with the table's rows as its output columns."""
    v, h = weight.shape
    q, scale = rtn_codes(weight.T, block_size, 8)
    return pack(q, 8), scale.reshape(v, h // block_size)


def int8_embed_model(weight: np.ndarray, dtype: str = "float32", block_size: int = 128) -> onnx.ModelProto:
    """The embed graph for a [V,H] float table (export_embed writes it, the table in a data file when large)."""
    if weight.shape[1] % block_size:
        block_size = 32
    codes, scales = quantize_rows(weight, block_size)
    out_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("GatherBlockQuantized", ["embed_tokens.qweight", "input_ids", "embed_tokens.scales"],
                            ["inputs_embeds"], name="embed_tokens", domain="com.microsoft", bits=8,
                            block_size=block_size, gather_axis=0, quantize_axis=1)
    graph = helper.make_graph(
        [node], "llava_edge_embed_int8",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("inputs_embeds", out_type, ["batch", "seq", weight.shape[1]])],
        initializer=[numpy_helper.from_array(codes, "embed_tokens.qweight"),
                     numpy_helper.from_array(scales.astype(np.dtype(dtype)), "embed_tokens.scales")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="llava-edge")
    model.ir_version = MAX_IR_VERSION
    return model
