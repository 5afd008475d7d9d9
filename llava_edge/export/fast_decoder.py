"""The fast decoder graph for onnxruntime: in-place KV cache, fused rotary, optional int4 weights.

Why a second decoder graph: the portable graph (past in, present = concat out) allocates and copies
the whole cache every token and spends most of a small model's step in mask/rotary glue ops. This
graph is written node by node with onnxruntime's contrib ops, one method per block (`DecoderBuilder`:
make_embedding / make_layer / make_layernorm / make_attention / make_mlp / make_norm / make_lm_head; a
family overrides a small hook, e.g. Phi-3 where its fused projections are, Qwen2 its q/k/v bias):

- GroupQueryAttention (com.microsoft) with past/present bound to ONE max-length buffer per layer
  (shared-buffer mode): k/v of the new tokens are written in place, nothing is allocated or copied per
  token. Rotary from the `position_ids` input (`positions`, the default): RotaryEmbedding (com.microsoft)
  on q and k, then GroupQueryAttention with do_rotary=0, so a token's position is what the runtime says
  while its k/v go to the row's next cache slot (pruned images keep their original positions while the
  cache fills densely; docs/pruning.md "Positions"). GroupQueryAttention's own position_ids input is not
  used: on a first prompt it reads only the first entry (consecutive positions from it), which
  benchmarks/prune_gqa_positions.py shows. `positions=False` writes the graph exported before: do_rotary=1,
  positions = cache index;
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
          position_ids int64 [B,S] (each new token's rotary position; only with `positions`),
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
from .graphs import rotary_inv_freq, split_linear

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
    positions: bool = True  # position_ids input (rotary by the runtime's positions); False: by cache index


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


class DecoderBuilder:
    """Writes the fast decoder graph of a LLaMA-family decoder block by block, as onnxruntime-genai's model
    builders do: `make_embedding` (the graph's input), `make_layer` per decoder layer (`make_layernorm`,
    `make_attention`, `make_mlp`), `make_norm` over the rows' last positions and `make_lm_head`.

    The base class is LLaMA (and Mistral: the same blocks). A family whose checkpoint differs overrides a
    small hook: where its projections are (`attention_projections`, `mlp_projections`: Phi-3's fused
    qkv_proj / gate_up_proj), its q/k/v bias (`qkv_bias`: Qwen2), its activation (`make_activation`).
    `builder_for` picks the class from the text config's model_type.

    Below the blocks: `init` (an initializer, streamed to the .data file from 1 KiB), `node` and `linear`
    (one MatMul or MatMulNBits for one or several projections that read the same input). Node and value
    names are numbered in creation order, so the blocks are called in one fixed order: a graph is written
    byte for byte the same way every time (tests/export/test_decoder_builder.py pins them)."""

    def __init__(self, model: Any, cfg: FastDecoderConfig):
        tc = model.config.text_config
        self.model, self.cfg, self.tc = model, cfg, tc
        self.lm = model.model.language_model
        self.heads, self.kv_heads = tc.num_attention_heads, tc.num_key_value_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // self.heads
        self.hidden, self.vocab, self.max_pos = tc.hidden_size, model.lm_head.out_features, tc.max_position_embeddings
        self.eps = float(tc.rms_norm_eps)
        self.dtype = np.dtype(cfg.dtype)
        self.quant = cfg.quant is not None
        self.check()
        self.data: _ExternalData | None = None
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._n = 0
        self.past_in: list[str] = []
        self.present_out: list[str] = []
        self.residual = ""  # the residual stream: the sum every layer's skip norms add to
        self.rotary: tuple[str, str] = ("", "")

    def check(self) -> None:
        """Refuse what the graph cannot express, before any file is written."""
        tc, cfg = self.tc, self.cfg
        if getattr(tc, "hidden_act", "silu") != "silu":
            raise ValueError(f"the fast decoder has SiLU MLPs only (config hidden_act={tc.hidden_act!r})")
        if (getattr(tc, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("the fast decoder rotates whole heads; partial_rotary_factor < 1 is not supported")
        if cfg.quant not in (None, "int4-rtn", INT4_DEQUANTIZED, INT4_PER_CHANNEL_DEQUANTIZED):
            raise ValueError(f"unknown quant {cfg.quant!r}; use None, 'int4-rtn', {INT4_DEQUANTIZED!r} "
                             f"or {INT4_PER_CHANNEL_DEQUANTIZED!r}")
        if cfg.lm_head_bits not in (None, 4, 8):
            raise ValueError(f"lm_head_bits must be None, 4 or 8, not {cfg.lm_head_bits!r}")

    # --- the graph, block by block -------------------------------------------------------------------

    def build(self, out_path: Path) -> GraphSpec:
        """Write the graph and its .data file; returns its GraphSpec."""
        data_path = out_path.with_name(out_path.name + ".data")
        self.data = _ExternalData(data_path)
        try:
            self.make_rotary()
            self.residual = self.make_embedding()
            skip = None
            for i, layer in enumerate(self.lm.layers):
                skip = self.make_layer(i, layer, skip)
            self.make_lm_head(self.make_norm(skip))
        finally:
            self.data.close()
        return self.save(out_path, data_path)

    def make_rotary(self) -> None:
        """cos/sin tables [max_pos, head_dim/2] exactly as transformers computes them (fp32 outer product,
        attention scaling), for GroupQueryAttention's fused rotary."""
        import torch

        inv_freq, scaling = rotary_inv_freq(self.lm.rotary_emb)
        with torch.no_grad():
            pos = torch.arange(self.max_pos, dtype=torch.float32)
            freqs = torch.outer(pos, inv_freq)
            cos = self.init("rotary.cos_cache", (freqs.cos() * scaling).numpy().astype(self.dtype))
            sin = self.init("rotary.sin_cache", (freqs.sin() * scaling).numpy().astype(self.dtype))
        self.rotary = (cos, sin)

    def make_embedding(self) -> str:
        """The decoder's input, the embedded tokens `inputs_embeds [B,S,H]`: the table is embed.onnx's
        (image features are spliced in between), so the graph starts from its input."""
        return "inputs_embeds"

    def make_layer(self, i: int, layer: Any, skip: str | None) -> str:
        """One pre-norm decoder layer; `skip` is the previous layer's MLP output, not yet added to the
        residual stream (each add is fused into the next norm). Returns this layer's MLP output."""
        h = self.make_layernorm(f"layers.{i}.input_layernorm", layer.input_layernorm, skip)
        attn = self.make_attention(i, layer, h)
        h = self.make_layernorm(f"layers.{i}.post_attention_layernorm", layer.post_attention_layernorm, attn)
        return self.make_mlp(i, layer, h)

    def make_layernorm(self, name: str, norm: Any, skip: str | None) -> str:
        """RMSNorm of residual + skip (SkipSimplifiedLayerNormalization, whose 4th output, the sum, becomes
        the residual stream), or of the residual alone when there is nothing to add (the first layer)."""
        w = self.init(f"{name}.weight", self.weight(norm.weight))
        if skip is None:
            return self.node("SimplifiedLayerNormalization", [self.residual, w], axis=-1, epsilon=self.eps)[0]
        h, _, _, self.residual = self.node("SkipSimplifiedLayerNormalization", [skip, self.residual, w], n_out=4,
                                           domain="com.microsoft", epsilon=self.eps)
        return h

    def make_attention(self, i: int, layer: Any, h: str) -> str:
        """q/k/v projections, GroupQueryAttention over this layer's in-place cache (rotary fused), o_proj."""
        q_proj, k_proj, v_proj, o_proj = self.attention_projections(layer)
        q, k, v = self.make_qkv(i, h, (q_proj, k_proj, v_proj), self.qkv_bias(q_proj, k_proj, v_proj))
        pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        ok, ov = f"present.{i}.key", f"present.{i}.value"
        self.past_in += [pk, pv]
        self.present_out += [ok, ov]
        if self.cfg.positions:
            q, k, v = self.make_rotary_qkv(q, k, v)
            attn = self.node("GroupQueryAttention", [q, k, v, pk, pv, "seqlens_k", "total_sequence_length"],
                             domain="com.microsoft", outputs=[self.name("attn"), ok, ov], num_heads=self.heads,
                             kv_num_heads=self.kv_heads, do_rotary=0, scale=float(self.head_dim**-0.5))[0]
            return self.linear(attn, o_proj.weight, f"layers.{i}.o_proj", self.quant, o_proj.bias)
        cos, sin = self.rotary
        attn = self.node("GroupQueryAttention", [q, k, v, pk, pv, "seqlens_k", "total_sequence_length", cos, sin],
                         domain="com.microsoft", outputs=[self.name("attn"), ok, ov], num_heads=self.heads,
                         kv_num_heads=self.kv_heads, do_rotary=1, rotary_interleaved=0,
                         scale=float(self.head_dim**-0.5))[0]
        return self.linear(attn, o_proj.weight, f"layers.{i}.o_proj", self.quant, o_proj.bias)

    def make_rotary_qkv(self, q: str, k: str, v: str) -> tuple[str, str, str]:
        """q and k rotated at `position_ids` (RotaryEmbedding, the same cos/sin tables GroupQueryAttention's
        fused rotary reads); a packed q|k|v (key and value empty) is split first."""
        if not k:
            sizes = "const.qkv_split"
            if not any(t.name == sizes for t in self.inits):
                d = self.head_dim
                self.init(sizes, np.array([self.heads * d, self.kv_heads * d, self.kv_heads * d], dtype=np.int64))
            q, k, v = self.node("Split", [q, sizes], n_out=3, axis=-1)
        cos, sin = self.rotary
        q = self.node("RotaryEmbedding", [q, "position_ids", cos, sin], domain="com.microsoft",
                      num_heads=self.heads, interleaved=0)[0]
        k = self.node("RotaryEmbedding", [k, "position_ids", cos, sin], domain="com.microsoft",
                      num_heads=self.kv_heads, interleaved=0)[0]
        return q, k, v

    def make_qkv(self, i: int, h: str, projs: tuple, biases: list) -> tuple[str, str, str]:
        """fuse: one packed q|k|v MatMul that GroupQueryAttention splits itself (key and value inputs
        empty); else three."""
        if self.cfg.fuse:
            return self.linear(h, [p.weight for p in projs], f"layers.{i}.qkv_proj", self.quant, biases), "", ""
        q, k, v = (self.linear(h, p.weight, f"layers.{i}.{n}_proj", self.quant, b)
                   for p, n, b in zip(projs, "qkv", biases))
        return q, k, v

    def make_mlp(self, i: int, layer: Any, h: str) -> str:
        """down(act(gate(h)) * up(h)); fuse: gate|up as one MatMul, split after it."""
        gate_proj, up_proj, down_proj = self.mlp_projections(layer)
        if self.cfg.fuse:
            gate_up = self.linear(h, [gate_proj.weight, up_proj.weight], f"layers.{i}.mlp.gate_up_proj", self.quant)
            gate, up = self.node("Split", [gate_up], n_out=2, axis=-1)
        else:
            gate = self.linear(h, gate_proj.weight, f"layers.{i}.mlp.gate_proj", self.quant)
            up = self.linear(h, up_proj.weight, f"layers.{i}.mlp.up_proj", self.quant)
        act = self.make_activation(gate, up)
        return self.linear(act, down_proj.weight, f"layers.{i}.mlp.down_proj", self.quant)

    def make_activation(self, gate: str, up: str) -> str:
        """SiLU(gate) * up; QuickGelu with alpha 1 is x * sigmoid(x): SiLU in one kernel."""
        return self.node("Mul", [self.node("QuickGelu", [gate], domain="com.microsoft", alpha=1.0)[0], up])[0]

    def make_norm(self, skip: str) -> str:
        """The last layer's add, then only the rows' last positions ([B,S,H] -> [B*S,H] -> gather
        logits_index) through the final norm: logits are [B,V], not [B,S,V]."""
        last = self.node("Add", [skip, self.residual])[0]
        shape = self.init("const.flat_shape", np.array([-1, self.hidden], dtype=np.int64))
        flat = self.node("Reshape", [last, shape])[0]
        rows = self.node("Gather", [flat, "logits_index"], axis=0)[0]
        norm_w = self.init("norm.weight", self.weight(self.lm.norm.weight))
        return self.node("SimplifiedLayerNormalization", [rows, norm_w], axis=-1, epsilon=self.eps)[0]

    def make_lm_head(self, x: str) -> str:
        """lm_head (float, or MatMulNBits at lm_head_bits / with the int4 layers), logits in fp32."""
        cfg = self.cfg
        head_quant = cfg.lm_head_bits is not None or (self.quant and cfg.quantize_lm_head)
        logits = self.linear(x, self.model.lm_head.weight, "lm_head", head_quant, bits=cfg.lm_head_bits or 4)
        if self.dtype != np.float32:
            return self.node("Cast", [logits], outputs=["logits"], to=TensorProto.FLOAT)[0]
        return self.node("Identity", [logits], outputs=["logits"])[0]

    def save(self, out_path: Path, data_path: Path) -> GraphSpec:
        """The graph's inputs and outputs (the contract in the module docstring), the model file."""
        onnx_dtype = helper.np_dtype_to_tensor_dtype(self.dtype)
        kv_shape: list[int | str] = ["batch", self.kv_heads, "max_len", self.head_dim]
        inputs = [
            helper.make_tensor_value_info("inputs_embeds", onnx_dtype, ["batch", "seq", self.hidden]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
            helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["batch"]),
            *([helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
              if self.cfg.positions else []),
            *[helper.make_tensor_value_info(n, onnx_dtype, kv_shape) for n in self.past_in],
        ]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", self.vocab]),
                   *[helper.make_tensor_value_info(n, onnx_dtype, kv_shape) for n in self.present_out]]
        graph = helper.make_graph(self.nodes, "llava_edge_fast_decoder", inputs, outputs, initializer=self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="llava-edge")
        proto.ir_version = MAX_IR_VERSION
        onnx.save_model(proto, str(out_path))

        def spec(vi: onnx.ValueInfoProto) -> TensorSpec:
            dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            return TensorSpec(vi.name, helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name, dims)

        return GraphSpec(file=out_path.name, inputs=[spec(v) for v in inputs], outputs=[spec(v) for v in outputs],
                         external_data=[data_path.name])

    # --- family hooks --------------------------------------------------------------------------------

    def attention_projections(self, layer: Any) -> tuple[Any, Any, Any, Any]:
        """(q, k, v, o) projections of a layer, each with `.weight` [out, in] and `.bias` (or None)."""
        a = layer.self_attn
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj

    def mlp_projections(self, layer: Any) -> tuple[Any, Any, Any]:
        """(gate, up, down) projections of a layer's MLP."""
        m = layer.mlp
        return m.gate_proj, m.up_proj, m.down_proj

    def qkv_bias(self, q: Any, k: Any, v: Any) -> list:
        """The q/k/v biases, None where a projection has none (LLaMA's attention_bias holds them)."""
        return [q.bias, k.bias, v.bias]

    # --- graph primitives ----------------------------------------------------------------------------

    def weight(self, t: Any) -> np.ndarray:
        return t.detach().float().numpy().astype(self.dtype)

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
        cfg = self.cfg
        weights = weights if isinstance(weights, (list, tuple)) else [weights]
        w_t = np.concatenate([w.detach().float().numpy().T for w in weights], axis=1)  # [in, out]
        bs = cfg.block_size if w_t.shape[0] % cfg.block_size == 0 else 32
        if quantize and bits == 4 and cfg.quant == INT4_DEQUANTIZED:  # the int4 values as float weights
            w_t, quantize = dequantize_int4_rtn(w_t, bs), False
        if quantize and bits == 4 and cfg.quant == INT4_PER_CHANNEL_DEQUANTIZED:
            w_t, quantize = dequantize_int4_rtn(w_t, w_t.shape[0]), False
        if quantize:
            k, n = w_t.shape
            packed, scales = quantize_rtn(w_t, bs, bits)
            b = self.init(name + ".qweight", packed)
            s = self.init(name + ".scales", scales.astype(self.dtype))
            y = self.node("MatMulNBits", [x, b, s], domain="com.microsoft", K=k, N=n, bits=bits, block_size=bs,
                          accuracy_level=cfg.accuracy_level)[0]
        else:
            w = self.init(name + ".weight_t", np.ascontiguousarray(w_t.astype(self.dtype)))
            y = self.node("MatMul", [x, w])[0]
        biases = biases if isinstance(biases, (list, tuple)) else [biases]
        if all(b is None for b in biases):
            return y
        bias = np.concatenate([(b.detach().float().numpy() if b is not None else np.zeros(w.shape[0], np.float32))
                               for b, w in zip(biases, weights)])
        return self.node("Add", [y, self.init(name + ".bias", bias.astype(self.dtype))])[0]


class Qwen2Builder(DecoderBuilder):
    """Qwen2 (LLaVA-Interleave, LLaVA-OneVision): LLaMA's blocks with a bias on q, k and v (not o)."""

    def qkv_bias(self, q: Any, k: Any, v: Any) -> list:
        biases = super().qkv_bias(q, k, v)
        if any(b is None for b in biases):  # every Qwen2 checkpoint has them: a missing one is a wrong mapping
            raise ValueError("a Qwen2 decoder layer without its q/k/v bias")
        return biases


class Phi3Builder(DecoderBuilder):
    """Phi-3: q/k/v stored as one qkv_proj and gate/up as one gate_up_proj; split into row slices here
    (a loaded checkpoint or LazyLlava has them split already), so every later stage sees one layout."""

    def attention_projections(self, layer: Any) -> tuple[Any, Any, Any, Any]:
        a = layer.self_attn
        if hasattr(a, "q_proj"):
            return super().attention_projections(layer)
        kv = self.kv_heads * self.head_dim
        q, k, v = split_linear(a.qkv_proj, [self.heads * self.head_dim, kv, kv])
        return q, k, v, a.o_proj

    def mlp_projections(self, layer: Any) -> tuple[Any, Any, Any]:
        m = layer.mlp
        if hasattr(m, "gate_proj"):
            return super().mlp_projections(layer)
        inter = m.gate_up_proj.out_features // 2
        gate, up = split_linear(m.gate_up_proj, [inter, inter])
        return gate, up, m.down_proj


# text_config.model_type -> builder. Mistral is LLaMA's blocks: its sliding window is not in the graph, the
# context is capped to it instead (checkpoint.context_limit). Other model types get the base class; the export
# check holds every graph to transformers.
BUILDERS: dict[str, type[DecoderBuilder]] = {"llama": DecoderBuilder, "mistral": DecoderBuilder,
                                             "qwen2": Qwen2Builder, "phi3": Phi3Builder}


def builder_for(model: Any) -> type[DecoderBuilder]:
    return BUILDERS.get(getattr(model.config.text_config, "model_type", "llama"), DecoderBuilder)


def build_fast_decoder(model: Any, out_path: Path, cfg: FastDecoderConfig) -> GraphSpec:
    """Write the graph (and its .data) for a LlavaForConditionalGeneration (or lazy.LazyLlava); returns its
    GraphSpec."""
    return builder_for(model)(model, cfg).build(out_path)


def export_fast_decoder(checkpoint_or_loaded: Any, package_dir: str | os.PathLike, dtype: str | None = None,
                        quant: str | None = None, name: str | None = None, block_size: int = 128,
                        accuracy_level: int = 4, quantize_lm_head: bool = False,
                        lm_head_bits: int | None = None, fuse: bool = True, positions: bool = True) -> GraphSpec:
    """Add a fast decoder graph to an existing package (manifest.graphs[name]).

    checkpoint_or_loaded: a checkpoint directory, a LoadedCheckpoint or a LlavaForConditionalGeneration
    (the same weights the package was exported from). dtype defaults to the package's. name defaults
    to "decoder_fast" ("decoder_fast_int4" with quant). ``positions=False`` writes the graph without the
    position_ids input (as exported before it: what tests of older packages need). Files are written
    under temporary names and renamed, then the manifest is rewritten last: an interrupted call leaves
    the package as it was.
    """
    root = Path(package_dir)
    manifest = load_manifest(root)
    cfg = FastDecoderConfig(name=name or ("decoder_fast_int4" if quant else "decoder_fast"),
                            dtype=dtype or manifest.dtype, quant=quant, block_size=block_size,
                            accuracy_level=accuracy_level, quantize_lm_head=quantize_lm_head,
                            lm_head_bits=lm_head_bits, fuse=fuse, positions=positions)
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
