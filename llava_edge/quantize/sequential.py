"""Layer-by-layer quantization of the decoder, the part that decides memory and quality.

For each decoder layer, in order:

1. bring the layer to the compute device in float32 (one layer resident there at a time);
2. true-sequential inside the layer: for each group (q/k/v, o, gate/up, down) replay the captured
   layer inputs through the *partially quantized* layer, accumulate the group's Hessian from the
   Linear inputs, quantize the group and write the dequantized weights back, so that later groups
   see the errors of earlier ones;
3. measure, on held-out samples, how far the layer's output moves with GPTQ and with RTN weights;
4. replay the inputs once more through the quantized layer: those outputs feed the next layer
   (errors propagate as they will at inference);
5. move the layer back and drop its weights' float32 copy.

Resident memory is the captured hidden states (samples x tokens x hidden), one layer in float32
and one Hessian per input group, independent of the number of layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .capture import LayerInput, _to, find_decoder
from .gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from ..packing import QuantizedLinear
from ..progress import progress_iter
from .rtn import rtn_quantize

# (torch name inside a decoder layer, canonical name used by the ONNX graph), in execution order.
SEQUENTIAL_GROUPS: list[list[tuple[str, str]]] = [
    [("self_attn.q_proj", "q_proj"), ("self_attn.k_proj", "k_proj"), ("self_attn.v_proj", "v_proj")],
    [("self_attn.o_proj", "o_proj")],
    [("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj")],
    [("mlp.down_proj", "mlp.down_proj")],
]


def canonical_name(layer: int, short: str) -> str:
    """``layers.{i}.q_proj`` / ``layers.{i}.mlp.gate_proj``: the ONNX initializer name minus
    ``.weight_t``, the key of every per-Linear result."""
    return f"layers.{layer}.{short}"


@dataclass
class QuantizeLayersConfig:
    method: str = "gptq"  # "gptq" | "rtn"
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    device: str = "cpu"
    quantize_lm_head: bool = False
    progress: bool = True


@dataclass
class LayerError:
    """Relative error of a decoder layer's *update* (output minus input) on held-out samples.

    The residual stream passes through a layer unchanged, so the error of the full output would
    be diluted by it; the update is what the quantized weights compute."""

    layer: int
    gptq: float | None
    rtn: float

    @property
    def ratio(self) -> float | None:
        return None if self.gptq is None or self.rtn == 0 else self.gptq / self.rtn


@dataclass
class QuantizeLayersResult:
    quantized: dict[str, QuantizedLinear]
    layer_errors: list[LayerError]
    damps: dict[str, float]
    skipped: dict[str, str]  # canonical name -> why it stays float
    group_sizes: dict[str, int]


def choose_group_size(in_features: int, group_size: int) -> int | None:
    """``group_size`` if it divides K, else the largest power of two >= 16 below it that does,
    else None (keep the Linear in float)."""
    g = group_size
    while g >= 16:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def _run_layer(layer: nn.Module, inputs: Sequence[LayerInput], device: str) -> list[torch.Tensor]:
    outs = []
    for inp in inputs:
        out = layer(inp.hidden.to(device), **_to(inp.kwargs, device))
        out = out[0] if isinstance(out, tuple) else out
        outs.append(out.detach().to("cpu", torch.float32))
    return outs


def _relative_update_error(ref: list[torch.Tensor], got: list[torch.Tensor], inputs: Sequence[LayerInput]) -> float:
    num = sum(float((g - r).pow(2).sum()) for g, r in zip(got, ref))
    den = sum(float((r - i.hidden).pow(2).sum()) for r, i in zip(ref, inputs))
    return math.sqrt(num / den) if den > 0 else 0.0


@torch.no_grad()
def quantize_layers(
    model: nn.Module,
    calib: list[LayerInput],
    holdout: list[LayerInput],
    cfg: QuantizeLayersConfig,
) -> QuantizeLayersResult:
    """Quantize every decoder Linear of ``model`` (and optionally lm_head) from captured layer-0
    inputs. ``calib`` and ``holdout`` are consumed (replaced layer by layer to bound memory)."""
    handles = find_decoder(model)
    gcfg = cfg.gptq
    result = QuantizeLayersResult({}, [], {}, {}, {})
    calib = list(calib)
    holdout = list(holdout)

    layers = list(enumerate(handles.layers))
    for i, layer in progress_iter(layers, f"{cfg.method} {gcfg.bits}-bit layers", enabled=cfg.progress):
        orig_param = next(layer.parameters())
        orig_device, orig_dtype = orig_param.device, orig_param.dtype
        layer.to(cfg.device, torch.float32)
        fp_weights: dict[str, torch.Tensor] = {}
        rtn_weights: dict[str, torch.Tensor] = {}
        for group in SEQUENTIAL_GROUPS:
            members = []
            for torch_name, short in group:
                name = canonical_name(i, short)
                lin = layer.get_submodule(torch_name)
                if not isinstance(lin, nn.Linear):
                    raise TypeError(f"{name}: expected nn.Linear, found {type(lin).__name__}")
                # a bias (Qwen2's q/k/v) stays float: the exported graph adds it after the MatMul
                g = choose_group_size(lin.in_features, gcfg.group_size)
                if g is None:
                    result.skipped[name] = f"in_features={lin.in_features} has no power-of-two group >= 16"
                    continue
                result.group_sizes[name] = g
                fp_weights[name] = lin.weight.detach().clone()
                rtn_q = rtn_quantize(lin.weight, gcfg.bits, g, gcfg.scale_dtype)
                rtn_weights[name] = rtn_q.dequantize().to(cfg.device)
                members.append((name, lin, g, rtn_q))
            if not members:
                continue
            if cfg.method == "rtn":
                for name, lin, g, rtn_q in members:
                    result.quantized[name] = rtn_q
                    lin.weight.copy_(rtn_weights[name])
                continue
            # All members of a group read the same input: one Hessian per group.
            acc = HessianAccumulator(members[0][1].in_features, cfg.device)
            # acc is bound now (default argument), not read from this scope, which `del acc` below empties
            hook = members[0][1].register_forward_pre_hook(lambda m, args, acc=acc: acc.add_batch(args[0]))
            try:
                _run_layer(layer, calib, cfg.device)
            finally:
                hook.remove()
            for name, lin, g, _ in members:
                res = gptq_quantize(lin.weight, acc.H, GPTQConfig(**{**gcfg.__dict__, "group_size": g}))
                result.quantized[name] = res.quantized
                result.damps[name] = res.damp
                lin.weight.copy_(res.quantized.dequantize())
            del acc

        if holdout:
            result.layer_errors.append(_holdout_errors(i, layer, holdout, fp_weights, rtn_weights, cfg))
        calib = [LayerInput(o, inp.kwargs) for o, inp in zip(_run_layer(layer, calib, cfg.device), calib)]
        holdout = [LayerInput(o, inp.kwargs) for o, inp in zip(_run_layer(layer, holdout, cfg.device), holdout)]
        layer.to(orig_device, orig_dtype)
        del fp_weights, rtn_weights

    if cfg.quantize_lm_head and handles.lm_head is not None:
        _quantize_lm_head(handles, calib, cfg, result)
    return result


def _holdout_errors(
    i: int,
    layer: nn.Module,
    holdout: list[LayerInput],
    fp_weights: dict[str, torch.Tensor],
    rtn_weights: dict[str, torch.Tensor],
    cfg: QuantizeLayersConfig,
) -> LayerError:
    """Layer-update error on held-out inputs with the current (quantized) weights, then with RTN
    weights, both against the float weights; leaves the quantized weights in place."""
    by_name = {canonical_name(i, short): layer.get_submodule(t) for g in SEQUENTIAL_GROUPS for t, short in g}
    current = {n: by_name[n].weight.detach().clone() for n in fp_weights}

    def run_with(weights: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        for n, w in weights.items():
            by_name[n].weight.copy_(w)
        return _run_layer(layer, holdout, cfg.device)

    ref = run_with(fp_weights)
    rtn = run_with(rtn_weights)
    quant = run_with(current)
    rtn_err = _relative_update_error(ref, rtn, holdout)
    q_err = _relative_update_error(ref, quant, holdout) if cfg.method == "gptq" else None
    return LayerError(i, q_err, rtn_err)


def _quantize_lm_head(handles: Any, calib: list[LayerInput], cfg: QuantizeLayersConfig,
                      result: QuantizeLayersResult) -> None:
    lin = handles.lm_head
    g = choose_group_size(lin.in_features, cfg.gptq.group_size)
    if g is None:
        result.skipped["lm_head"] = f"in_features={lin.in_features} has no power-of-two group >= 16"
        return
    result.group_sizes["lm_head"] = g
    w = lin.weight.detach().to(cfg.device, torch.float32)
    if cfg.method == "rtn":
        result.quantized["lm_head"] = rtn_quantize(w, cfg.gptq.bits, g, cfg.gptq.scale_dtype)
        return
    norm_dtype = next(handles.norm.parameters()).dtype
    acc = HessianAccumulator(lin.in_features, cfg.device)
    for inp in calib:
        acc.add_batch(handles.norm(inp.hidden.to(cfg.device, norm_dtype)).float())
    res = gptq_quantize(w, acc.H, GPTQConfig(**{**cfg.gptq.__dict__, "group_size": g}))
    result.quantized["lm_head"] = res.quantized
    result.damps["lm_head"] = res.damp
