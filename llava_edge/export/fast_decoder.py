"""The fast decoder graph for onnxruntime: in-place KV cache, fused rotary, optional int4 weights.

Why a second decoder graph: the portable graph (past in, present = concat out) allocates and copies
the whole cache every token and spends most of a small model's step in mask/rotary glue ops. This
graph is written node by node with onnxruntime's contrib ops:

- GroupQueryAttention (com.microsoft) with do_rotary=1 (rotary fused, cos/sin tables as initializers)
  and past/present bound to ONE max-length buffer per layer (shared-buffer mode): k/v of the new
  tokens are written in place, nothing is allocated or copied per token;
- SkipSimplifiedLayerNormalization fuses each residual add with the next RMSNorm;
- only the rows' last positions go through the final norm and lm_head (logits [B,V], not [B,T,V]);
- ragged batches: rows are stored right-padded from position 0 with their own lengths (seqlens_k),
  which is what GQA wants; the runtime converts the pipeline's left-padded prompt once, at prefill.

MatMul weights keep the portable graph's names (`layers.{i}.q_proj.weight_t`, ..., `lm_head.weight_t`,
[in, out]) so the quantizer's MatMulNBits replacement plugs into this graph by name. For speed work
without the quantization stage, `quant="int4-rtn"` writes round-to-nearest symmetric int4 MatMulNBits
(speed does not depend on how the int4 values were chosen; quality does: use GPTQ for real models).

Graph contract:
  inputs  inputs_embeds [B,S,H], seqlens_k int32 [B] (tokens in the cache after this step, minus 1),
          total_sequence_length int32 [] (max over rows of seqlens_k + 1),
          logits_index int64 [B] (flat index b*S + s of each row's last real token),
          past_key_values.{i}.key/value [B,kvH,max_len,D]
  outputs logits float32 [B,V], present.{i}.key/value (same buffers as past when bound in place)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper

from ..onnx_io import MAX_IR_VERSION
from ..package import GraphSpec, TensorSpec, load_manifest, write_manifest
from ..packing import pack, qrange
from .graphs import layer_projections, rotary_inv_freq

# quant value of the float twin of an int4-rtn graph: same rounded weights, stored as float MatMul
INT4_DEQUANTIZED = "int4-rtn-dequantized"
# the same with one scale per output channel over all of K (group = K): MatMulNBits cannot hold it when K is
# not a power of two, so it exists only as a float twin (benchmarks/quant_accuracy: what groups are worth)
INT4_PER_CHANNEL_DEQUANTIZED = "int4-rtn-per-channel-dequantized"
_ALIGN = 4096  # external data offsets page-aligned so onnxruntime can map them


@dataclass
class FastDecoderConfig:
    """What was built; stored in manifest.extra['fast_decoders'][name]."""

    name: str = "decoder_fast"
    dtype: str = "float32"  # float32 / float16 activations and unquantized weights
    quant: str | None = None  # None, "int4-rtn", INT4_DEQUANTIZED (export's check) or INT4_PER_CHANNEL_DEQUANTIZED
    block_size: int = 128  # int4 block along K
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fast path), 0 = exact to the weights
    quantize_lm_head: bool = False  # lm_head in int4 with the rest (quality: docs/quantization.md)
    lm_head_bits: int | None = None  # 8: lm_head as 8-bit MatMulNBits even when the rest is float or int4
    fuse: bool = True  # q/k/v as one MatMul feeding GQA packed, gate/up as one MatMul (one kernel each)


class _ExternalData:
    """Streams initializers to one .data file as they are produced: the 1B model never exists twice
    in memory (torch weights + a 4 GB protobuf), and the 2 GB protobuf limit does not apply."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        pad = (-self.offset) % _ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        data = array.tobytes()
        self.f.write(data)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += len(data)
        return t

    def close(self) -> None:
        self.f.close()


def rtn_codes(w_t: np.ndarray, block_size: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest of a [K,N] weight per output column and K block: signed values int8
    [N,K] and scales float32 [N, K/bs, 1]."""
    k, n = w_t.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of the int{bits} block size {block_size}")
    lo, hi = qrange(bits)
    w = w_t.T.astype(np.float32).reshape(n, k // block_size, block_size)
    scale = np.abs(w).max(axis=-1, keepdims=True) / hi
    scale[scale == 0] = 1.0
    return np.clip(np.rint(w / scale), lo, hi).astype(np.int8).reshape(n, k), scale


def quantize_rtn(w_t: np.ndarray, block_size: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """[K,N] float weight -> MatMulNBits B uint8 [N, K/bs, bs*bits/8] and scales [N*K/bs] (default zero
    point 2^(bits-1)). Symmetric round-to-nearest per output column and K block, in the one packed
    layout of quantize/packing.py (int4: element 2j in the low nibble of byte j)."""
    k, n = w_t.shape
    q, scale = rtn_codes(w_t, block_size, bits)
    packed = pack(q, bits).reshape(n, k // block_size, block_size * bits // 8)
    return packed, scale.reshape(-1)


def quantize_int4_rtn(w_t: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_rtn at 4 bits: MatMulNBits B uint8 [N, K/bs, bs/2] and scales [N*K/bs] (zero point 8)."""
    return quantize_rtn(w_t, block_size, 4)


def dequantize_int4_rtn(w_t: np.ndarray, block_size: int) -> np.ndarray:
    """The [K,N] float weight quantize_int4_rtn's values and scales stand for (q * scale): the weights of
    the float twin an int4 graph is checked against at export."""
    k, n = w_t.shape
    q, scale = rtn_codes(w_t, block_size)
    return (q.reshape(n, k // block_size, block_size) * scale).reshape(n, k).T


def _llava_model(checkpoint_or_loaded: Any):
    if isinstance(checkpoint_or_loaded, (str, os.PathLike)):
        from .checkpoint import load_checkpoint

        return load_checkpoint(checkpoint_or_loaded).model
    if hasattr(checkpoint_or_loaded, "lm_head"):  # already a LlavaForConditionalGeneration
        return checkpoint_or_loaded
    return checkpoint_or_loaded.model  # a LoadedCheckpoint


class _GraphBuilder:
    def __init__(self, data: _ExternalData, dtype: np.dtype, cfg: FastDecoderConfig):
        self.data, self.dtype, self.cfg = data, dtype, cfg
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def init(self, name: str, array: np.ndarray) -> str:
        if array.nbytes < 1024:  # shape constants must be inline (shape inference reads them)
            self.inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        else:
            self.inits.append(self.data.add(name, array))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", outputs: list[str] | None = None,
             **attrs: Any) -> list[str]:
        outs = outputs or [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), domain=domain or None, **attrs))
        return outs

    def linear(self, x: str, weights: Any, name: str, quantize: bool, biases: Any = None, bits: int = 4) -> str:
        """x @ concat(weights).T (+ biases): one MatMul (or MatMulNBits) for one or several torch [out, in]
        weights that read the same input (fused q/k/v, gate/up), so the matrix is walked by one kernel
        call; each part is quantized on its own rows, so fusing does not change a single value."""
        weights = weights if isinstance(weights, (list, tuple)) else [weights]
        w_t = np.concatenate([w.detach().float().numpy().T for w in weights], axis=1)  # [in, out]
        bs = self.cfg.block_size if w_t.shape[0] % self.cfg.block_size == 0 else 32
        if quantize and bits == 4 and self.cfg.quant == INT4_DEQUANTIZED:  # the int4 values as float weights
            w_t, quantize = dequantize_int4_rtn(w_t, bs), False
        if quantize and bits == 4 and self.cfg.quant == INT4_PER_CHANNEL_DEQUANTIZED:
            w_t, quantize = dequantize_int4_rtn(w_t, w_t.shape[0]), False
        if quantize:
            k, n = w_t.shape
            packed, scales = quantize_rtn(w_t, bs, bits)
            b = self.init(name + ".qweight", packed)
            s = self.init(name + ".scales", scales.astype(self.dtype))
            y = self.node("MatMulNBits", [x, b, s], domain="com.microsoft", K=k, N=n, bits=bits, block_size=bs,
                          accuracy_level=self.cfg.accuracy_level)[0]
        else:
            w = self.init(name + ".weight_t", np.ascontiguousarray(w_t.astype(self.dtype)))
            y = self.node("MatMul", [x, w])[0]
        biases = biases if isinstance(biases, (list, tuple)) else [biases]
        if all(b is None for b in biases):
            return y
        bias = np.concatenate([(b.detach().float().numpy() if b is not None else np.zeros(w.shape[0], np.float32))
                               for b, w in zip(biases, weights)])
        return self.node("Add", [y, self.init(name + ".bias", bias.astype(self.dtype))])[0]


def build_fast_decoder(model: Any, out_path: Path, cfg: FastDecoderConfig) -> GraphSpec:
    """Write the graph (and its .data) for a LlavaForConditionalGeneration; returns its GraphSpec."""
    import torch

    lm = model.model.language_model
    tc = model.config.text_config
    n_layers, heads, kv_heads = tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    hidden, vocab, max_pos = tc.hidden_size, model.lm_head.out_features, tc.max_position_embeddings
    eps = float(tc.rms_norm_eps)
    if getattr(tc, "hidden_act", "silu") != "silu":
        raise ValueError(f"the fast decoder has SiLU MLPs only (config hidden_act={tc.hidden_act!r})")
    if (getattr(tc, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("the fast decoder rotates whole heads; partial_rotary_factor < 1 is not supported")
    dtype = np.dtype(cfg.dtype)
    onnx_dtype = helper.np_dtype_to_tensor_dtype(dtype)
    quant = cfg.quant is not None
    if cfg.quant not in (None, "int4-rtn", INT4_DEQUANTIZED, INT4_PER_CHANNEL_DEQUANTIZED):
        raise ValueError(f"unknown quant {cfg.quant!r}; use None, 'int4-rtn', {INT4_DEQUANTIZED!r} "
                         f"or {INT4_PER_CHANNEL_DEQUANTIZED!r}")
    if cfg.lm_head_bits not in (None, 4, 8):
        raise ValueError(f"lm_head_bits must be None, 4 or 8, not {cfg.lm_head_bits!r}")

    data_path = out_path.with_name(out_path.name + ".data")
    data = _ExternalData(data_path)
    g = _GraphBuilder(data, dtype, cfg)
    try:
        # rotary tables exactly as transformers computes them (fp32 outer product, attention scaling)
        inv_freq, scaling = rotary_inv_freq(lm.rotary_emb)
        with torch.no_grad():
            pos = torch.arange(max_pos, dtype=torch.float32)
            freqs = torch.outer(pos, inv_freq)
            cos = g.init("rotary.cos_cache", (freqs.cos() * scaling).numpy().astype(dtype))
            sin = g.init("rotary.sin_cache", (freqs.sin() * scaling).numpy().astype(dtype))

        past_in, present_out = [], []
        x = "inputs_embeds"
        residual = None
        down = None
        for i, layer in enumerate(lm.layers):
            q_proj, k_proj, v_proj, o_proj, mlp = layer_projections(layer, heads, kv_heads, head_dim)
            ln_w = g.init(f"layers.{i}.input_layernorm.weight",
                          layer.input_layernorm.weight.detach().float().numpy().astype(dtype))
            if residual is None:
                h = g.node("SimplifiedLayerNormalization", [x, ln_w], axis=-1, epsilon=eps)[0]
                residual = x
            else:
                h, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [down, residual, ln_w], n_out=4,
                                           domain="com.microsoft", epsilon=eps)
            projs = (q_proj, k_proj, v_proj)
            if cfg.fuse:  # packed q|k|v: GroupQueryAttention splits it itself (key and value inputs empty)
                q = g.linear(h, [p.weight for p in projs], f"layers.{i}.qkv_proj", quant, [p.bias for p in projs])
                k = v = ""
            else:
                q, k, v = (g.linear(h, p.weight, f"layers.{i}.{n}_proj", quant, p.bias) for p, n in zip(projs, "qkv"))
            pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
            ok, ov = f"present.{i}.key", f"present.{i}.value"
            past_in += [pk, pv]
            present_out += [ok, ov]
            attn = g.node("GroupQueryAttention", [q, k, v, pk, pv, "seqlens_k", "total_sequence_length", cos, sin],
                          domain="com.microsoft", outputs=[g.name("attn"), ok, ov], num_heads=heads,
                          kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
                          scale=float(head_dim**-0.5))[0]
            o = g.linear(attn, o_proj.weight, f"layers.{i}.o_proj", quant, o_proj.bias)
            post_w = g.init(f"layers.{i}.post_attention_layernorm.weight",
                            layer.post_attention_layernorm.weight.detach().float().numpy().astype(dtype))
            h2, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [o, residual, post_w], n_out=4,
                                        domain="com.microsoft", epsilon=eps)
            if cfg.fuse:
                gate_up = g.linear(h2, [mlp.gate_proj.weight, mlp.up_proj.weight], f"layers.{i}.mlp.gate_up_proj", quant)
                gate, up = g.node("Split", [gate_up], n_out=2, axis=-1)
            else:
                gate = g.linear(h2, mlp.gate_proj.weight, f"layers.{i}.mlp.gate_proj", quant)
                up = g.linear(h2, mlp.up_proj.weight, f"layers.{i}.mlp.up_proj", quant)
            # QuickGelu with alpha 1 is x * sigmoid(x): SiLU in one kernel
            act = g.node("Mul", [g.node("QuickGelu", [gate], domain="com.microsoft", alpha=1.0)[0], up])[0]
            down = g.linear(act, mlp.down_proj.weight, f"layers.{i}.mlp.down_proj", quant)

        # last positions only: [B,S,H] -> [B*S,H] -> gather rows -> norm -> lm_head
        last = g.node("Add", [down, residual])[0]
        shape = g.init("const.flat_shape", np.array([-1, hidden], dtype=np.int64))
        flat = g.node("Reshape", [last, shape])[0]
        rows = g.node("Gather", [flat, "logits_index"], axis=0)[0]
        norm_w = g.init("norm.weight", lm.norm.weight.detach().float().numpy().astype(dtype))
        normed = g.node("SimplifiedLayerNormalization", [rows, norm_w], axis=-1, epsilon=eps)[0]
        head_quant = cfg.lm_head_bits is not None or (quant and cfg.quantize_lm_head)
        logits = g.linear(normed, model.lm_head.weight, "lm_head", head_quant, bits=cfg.lm_head_bits or 4)
        if dtype != np.float32:
            g.node("Cast", [logits], outputs=["logits"], to=TensorProto.FLOAT)
        else:
            g.node("Identity", [logits], outputs=["logits"])
    finally:
        data.close()

    kv_shape: list[int | str] = ["batch", kv_heads, "max_len", head_dim]
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", onnx_dtype, ["batch", "seq", hidden]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["batch"]),
        *[helper.make_tensor_value_info(n, onnx_dtype, kv_shape) for n in past_in],
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", vocab]),
               *[helper.make_tensor_value_info(n, onnx_dtype, kv_shape) for n in present_out]]
    graph = helper.make_graph(g.nodes, "llava_edge_fast_decoder", inputs, outputs, initializer=g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="llava-edge")
    proto.ir_version = MAX_IR_VERSION
    onnx.save_model(proto, str(out_path))

    def spec(vi: onnx.ValueInfoProto) -> TensorSpec:
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        return TensorSpec(vi.name, helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name, dims)

    return GraphSpec(file=out_path.name, inputs=[spec(v) for v in inputs], outputs=[spec(v) for v in outputs],
                     external_data=[data_path.name])


def export_fast_decoder(checkpoint_or_loaded: Any, package_dir: str | os.PathLike, dtype: str | None = None,
                        quant: str | None = None, name: str | None = None, block_size: int = 128,
                        accuracy_level: int = 4, quantize_lm_head: bool = False,
                        lm_head_bits: int | None = None, fuse: bool = True) -> GraphSpec:
    """Add a fast decoder graph to an existing package (manifest.graphs[name]).

    checkpoint_or_loaded: a checkpoint directory, a LoadedCheckpoint or a LlavaForConditionalGeneration
    (the same weights the package was exported from). dtype defaults to the package's. name defaults
    to "decoder_fast" ("decoder_fast_int4" with quant). Files are written under temporary names and
    renamed, then the manifest is rewritten last: an interrupted call leaves the package as it was.
    """
    root = Path(package_dir)
    manifest = load_manifest(root)
    cfg = FastDecoderConfig(name=name or ("decoder_fast_int4" if quant else "decoder_fast"),
                            dtype=dtype or manifest.dtype, quant=quant, block_size=block_size,
                            accuracy_level=accuracy_level, quantize_lm_head=quantize_lm_head,
                            lm_head_bits=lm_head_bits, fuse=fuse)
    model = _llava_model(checkpoint_or_loaded)
    tmp = root / f".{cfg.name}.partial.onnx"
    try:
        spec = build_fast_decoder(model, tmp, cfg)
        final = root / f"{cfg.name}.onnx"
        # the graph names its data file; rewrite the location after the rename
        proto = onnx.load(str(tmp), load_external_data=False)
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = final.name + ".data"
        os.replace(root / spec.external_data[0], root / (final.name + ".data"))
        onnx.save_model(proto, str(final))
        tmp.unlink()
    except BaseException:
        for p in root.glob(f".{cfg.name}.partial.onnx*"):
            p.unlink()
        raise
    spec.file, spec.external_data = final.name, [final.name + ".data"]
    manifest.graphs[cfg.name] = spec
    manifest.extra.setdefault("fast_decoders", {})[cfg.name] = asdict(cfg)
    write_manifest(root, manifest)
    return spec
