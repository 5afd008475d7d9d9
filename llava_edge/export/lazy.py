"""The decoder of a checkpoint read a tensor at a time, for exports that never hold the whole model.

`load_checkpoint(lazy_decoder=True)` reads only the vision tower, projector and embedding table; the
decoder's layers, final norm and lm_head stay in the weights files (`LoadedCheckpoint.deferred`). Here:

- `DecoderWeights`: those tensors by model key, each read from its file when asked for and not kept;
- `LazyLlava`: the attribute paths the fast decoder builder reads from a LlavaForConditionalGeneration
  (`model.language_model.layers[i].self_attn.q_proj.weight`, `.mlp.gate_proj`, the norms, `lm_head`,
  `rotary_emb`, `config.text_config`), each `.weight` a fresh read: building the graph holds one tensor;
- `reference_model`: a real transformers model truncated to its first n decoder layers (plus the final
  norm and lm_head), the reference the graph built from `LazyLlava(..., num_layers=n)` is checked
  against when the whole model cannot be held. It reads the tensors by their own state-dict names, not
  through LazyLlava, so a wrong mapping in the view is a difference the check sees.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import torch

from .checkpoint import LoadedCheckpoint, TensorRef, _materialize_buffers, is_decoder_key
from .graphs import unfuse_projections


class DecoderWeights:
    """The deferred decoder tensors of a lazily loaded checkpoint, converted to `dtype` on each read."""

    def __init__(self, ck: LoadedCheckpoint, dtype: torch.dtype):
        self.refs, self.dtype = ck.deferred, dtype

    def __contains__(self, key: str) -> bool:
        return key in self.refs

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.refs[key].shape)

    def read(self, key: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        ref, dtype = self.refs[key], dtype or self.dtype
        if isinstance(ref, TensorRef):
            return ref.read(dtype, rows)
        t = ref[rows[0]:rows[1]] if rows else ref  # a .bin file's mapped tensor, or a tied embedding table
        return t.to(dtype) if t.is_floating_point() else t

    def nbytes(self, itemsize: int) -> int:
        """Bytes of all deferred tensors at `itemsize` bytes per element."""
        return sum(itemsize * int(torch.Size(r.shape).numel()) for r in self.refs.values())


class _Linear:
    """weight / bias of one projection (rows: a slice of a fused one, Phi-3's qkv_proj / gate_up_proj)."""

    def __init__(self, weights: DecoderWeights, prefix: str, rows: tuple[int, int] | None = None):
        self._w, self._prefix, self._rows = weights, prefix, rows

    @property
    def weight(self) -> torch.Tensor:
        return self._w.read(self._prefix + ".weight", self._rows)

    @property
    def bias(self) -> torch.Tensor | None:
        key = self._prefix + ".bias"
        return self._w.read(key, self._rows) if key in self._w else None

    @property
    def out_features(self) -> int:
        return self._rows[1] - self._rows[0] if self._rows else self._w.shape(self._prefix + ".weight")[0]

    @property
    def in_features(self) -> int:
        return self._w.shape(self._prefix + ".weight")[1]


class _Norm:
    def __init__(self, weights: DecoderWeights, prefix: str):
        self._w, self._prefix = weights, prefix

    @property
    def weight(self) -> torch.Tensor:
        return self._w.read(self._prefix + ".weight")


def _split(weights: DecoderWeights, prefix: str, sizes: list[int]) -> list[_Linear]:
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    return [_Linear(weights, prefix, b) for b in bounds]


def _layer(weights: DecoderWeights, tc: Any, i: int) -> SimpleNamespace:
    """One decoder layer in the split layout (q/k/v_proj, gate/up_proj), whatever the family stored."""
    from transformers.activations import ACT2FN

    p = f"model.language_model.layers.{i}"
    heads, kv_heads = tc.num_attention_heads, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    if f"{p}.self_attn.q_proj.weight" in weights:
        q, k, v = (_Linear(weights, f"{p}.self_attn.{n}_proj") for n in "qkv")
    else:
        q, k, v = _split(weights, f"{p}.self_attn.qkv_proj",
                         [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    if f"{p}.mlp.gate_proj.weight" in weights:
        gate, up = _Linear(weights, f"{p}.mlp.gate_proj"), _Linear(weights, f"{p}.mlp.up_proj")
    else:
        inter = weights.shape(f"{p}.mlp.gate_up_proj.weight")[0] // 2
        gate, up = _split(weights, f"{p}.mlp.gate_up_proj", [inter, inter])
    attn = SimpleNamespace(q_proj=q, k_proj=k, v_proj=v, o_proj=_Linear(weights, f"{p}.self_attn.o_proj"))
    mlp = SimpleNamespace(gate_proj=gate, up_proj=up, down_proj=_Linear(weights, f"{p}.mlp.down_proj"),
                          act_fn=ACT2FN[getattr(tc, "hidden_act", "silu")])
    return SimpleNamespace(self_attn=attn, mlp=mlp, input_layernorm=_Norm(weights, f"{p}.input_layernorm"),
                           post_attention_layernorm=_Norm(weights, f"{p}.post_attention_layernorm"))


def truncated_config(config: Any, num_layers: int) -> Any:
    """A copy of a LLaVA config whose language model has only its first num_layers layers."""
    config = copy.deepcopy(config)
    tc = config.text_config
    tc.num_hidden_layers = num_layers
    if getattr(tc, "layer_types", None):
        tc.layer_types = list(tc.layer_types)[:num_layers]
    return config


class LazyLlava:
    """What build_fast_decoder reads from a LlavaForConditionalGeneration, backed by DecoderWeights.

    Every `.weight` is read from the checkpoint file when accessed and belongs to the caller, so the
    builder holds one tensor at a time. num_layers < the model's: the first num_layers layers and the
    real final norm and lm_head (the graph the layer-sized check compares with reference_model)."""

    def __init__(self, ck: LoadedCheckpoint, dtype: torch.dtype, num_layers: int | None = None):
        tc = ck.model.config.text_config
        n = tc.num_hidden_layers if num_layers is None else num_layers
        self.config = truncated_config(ck.model.config, n)
        self.weights = DecoderWeights(ck, dtype)
        tc = self.config.text_config
        lm = SimpleNamespace(layers=[_layer(self.weights, tc, i) for i in range(n)],
                             norm=_Norm(self.weights, "model.language_model.norm"),
                             rotary_emb=ck.model.model.language_model.rotary_emb)
        self.model = SimpleNamespace(language_model=lm)
        self.lm_head = _Linear(self.weights, "lm_head")


def reference_model(ck: LoadedCheckpoint, num_layers: int) -> torch.nn.Module:
    """transformers' LLaVA (fp32, eval) with the checkpoint's vision tower, projector and embedding table
    (shared with ck.model) and its first num_layers decoder layers, final norm and lm_head read from the
    files by their state-dict names. num_layers = all layers: the whole model, as a full load gives."""
    config = truncated_config(ck.model.config, num_layers)
    with torch.device("meta"):
        model = type(ck.model)(config)
    inner, src = model.model, ck.model.model
    inner.vision_tower, inner.multi_modal_projector = src.vision_tower, src.multi_modal_projector
    inner.language_model.embed_tokens = src.language_model.embed_tokens
    if hasattr(src, "image_newline"):
        inner.image_newline = src.image_newline
    weights = DecoderWeights(ck, torch.float32)
    state = {k: weights.read(k) for k in model.state_dict() if is_decoder_key(k) and k in weights}
    model.load_state_dict(state, strict=False, assign=True)
    _materialize_buffers(model)  # rotary tables; raises if a decoder weight was not in the files
    unfuse_projections(model)
    return model.float().eval()
