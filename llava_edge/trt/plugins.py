"""Our Triton kernels as TensorRT plugins: the ONNX node form, AOT (ahead-of-time PTX) compilation and the
``tensorrt.plugin`` (QDP) registrations. An engine with an AOT plugin carries the kernel's PTX, so it runs
in a plain TensorRT runtime with no Python callback per layer. ``tensorrt`` and ``triton`` are imported
lazily; the version policy and plugin I/O are in ``contract.py``; the TensorRT facts this relies on are
in docs/architecture.md ("TensorRT version policy").
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from ..contract import AOT_MIN, ONNX_DOMAIN, PLUGIN_IO, PLUGIN_NAMESPACE, parse_trt_version
from ..kernels.aot import AotKernel

__all__ = [
    "plugin_node",
    "AotKernel",
    "compile_decode_attention",
    "compile_prefill_attention",
    "compile_int4_matmul",
    "register_plugins",
]

def plugin_node(
    op: str,
    inputs: list[str],
    outputs: list[str],
    *,
    name: str | None = None,
    aot: bool = True,
    **attrs: Any,
):
    """The ONNX node TensorRT's parser turns into our QDP ``llava_edge::<op>``.

    ``attrs`` are the plugin attributes (e.g. ``num_splits``, ``block_n``, ``sm_scale``). The graph
    must import opset ``ONNX_DOMAIN`` version 1.
    """
    import onnx

    if op not in PLUGIN_IO:
        raise ValueError(f"unknown plugin {op!r}; known: {sorted(PLUGIN_IO)}")
    want_in, want_out = PLUGIN_IO[op]
    if len(inputs) != len(want_in) or len(outputs) != len(want_out):
        raise ValueError(f"{op} takes inputs {want_in} and outputs {want_out}")
    return onnx.helper.make_node(
        op, inputs, outputs, name=name, domain=ONNX_DOMAIN, plugin_namespace=PLUGIN_NAMESPACE,
        aot=bool(aot), **attrs,
    )


# ---------------------------------------------------------------------------------- AOT compilation
_TL = {"float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}


def _target(cc: int | None):
    from triton.backends.compiler import GPUTarget

    if cc is None:
        import torch

        major, minor = torch.cuda.get_device_capability()
        cc = major * 10 + minor
    return GPUTarget("cuda", cc, 32)


def drop_hidden_params(ptx: str, name: str, num_params: int, scratch_bytes: int = 0) -> str:
    """Remove the trailing pointer parameters Triton >= 3.3 appends to every kernel.

    Triton's own launcher passes two hidden pointers after the user's arguments (global and profile
    scratch). TensorRT's AOT launcher passes exactly inputs, extra scalars and outputs, so a kernel
    declaring more parameters than that would have the driver read argument slots nobody filled.
    Our kernels use no scratch (``scratch_bytes == 0``) and the hidden parameters are then never
    loaded, so dropping them from the ``.entry`` declaration gives a kernel whose ABI is exactly what
    TensorRT passes; a TensorRT that passes the extra pointers anyway is harmless (surplus launch
    arguments are not read). Refuses, rather than guesses, when a hidden parameter is used.
    """
    start = ptx.index(f".entry {name}(")
    end = ptx.index(")", start)
    decl = ptx[start:end].split("\n")
    params = [i for i, line in enumerate(decl) if ".param" in line]
    extra = len(params) - num_params
    if extra == 0:
        return ptx
    hidden = [decl[i].strip().rstrip(",").split()[-1] for i in params[num_params:]]
    used = [h for h in hidden if len(re.findall(rf"\b{h}\b", ptx)) > 1]
    if extra < 0 or extra > 2 or scratch_bytes or used:
        raise RuntimeError(
            f"{name}: {len(params)} PTX parameters for {num_params} kernel arguments (scratch {scratch_bytes} B, "
            f"hidden parameters used: {used}); TensorRT's AOT launch would not match this kernel's ABI"
        )
    kept = decl[: params[num_params - 1] + 1]
    kept[-1] = kept[-1].rstrip().rstrip(",")
    return ptx[:start] + "\n".join(kept) + "\n" + ptx[end:]


def _compile(fn, pointers: dict[str, str], ints: list[str], constexprs: dict[str, Any], cc: int | None,
             num_warps: int) -> AotKernel:
    import triton

    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("AOT compilation needs real Triton kernels: unset TRITON_INTERPRET in this process")
    sig = dict(pointers)
    sig.update({n: "i32" for n in ints})
    sig.update({n: "constexpr" for n in constexprs})
    missing = set(fn.arg_names) - set(sig)
    if missing:
        raise RuntimeError(f"AOT signature for {fn.__name__} misses {sorted(missing)}")
    target = _target(cc)
    k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                       options={"num_warps": num_warps})
    md = k.metadata
    scratch = getattr(md, "global_scratch_size", 0) + getattr(md, "profile_scratch_size", 0)
    ptx = drop_hidden_params(k.asm["ptx"], md.name, len(pointers) + len(ints), scratch)
    return AotKernel(md.name, ptx, md.num_warps, md.shared, target.arch)


def compile_decode_attention(
    dtype: str, head_dim: int, group: int, num_splits: int, block_n: int = 64,
    sm_scale: float | None = None, cc: int | None = None, num_warps: int | None = None,
) -> AotKernel:
    import triton

    from ..kernels.decode_attention import DECODE_NUM_WARPS
    from ..kernels.decode_attention import _decode_attention_kernel as fn

    t = "*" + _TL[dtype]
    ptrs = {n: t for n in ("Q", "K_new", "V_new", "K_cache", "V_cache", "Out", "K_cache_out", "V_cache_out")}
    ptrs.update(Seq_lens="*i32", Cos="*fp32", Sin="*fp32", Partial_O="*fp32", Partial_ML="*fp32",
                Counters="*i32", Partial_O_out="*fp32", Partial_ML_out="*fp32", Counters_out="*i32")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    const = dict(HEAD_DIM=head_dim, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
                 NUM_SPLITS=num_splits, QK_SCALE=scale * 1.4426950408889634,
                 DOT_PRECISION="ieee" if dtype == "float32" else "tf32")
    return _compile(fn, ptrs, ["num_kv_heads", "max_seq"], const, cc, num_warps or DECODE_NUM_WARPS)


def compile_prefill_attention(
    dtype: str, head_dim: int, group: int, block_m: int = 64, block_n: int = 64,
    sm_scale: float | None = None, cc: int | None = None, num_warps: int | None = None,
) -> AotKernel:
    from ..kernels.prefill_attention import _prefill_attention_kernel as fn
    from ..kernels.prefill_attention import default_num_warps

    t = "*" + _TL[dtype]
    ptrs = {n: t for n in ("Q", "K", "V", "K_cache", "V_cache", "Out", "K_cache_out", "V_cache_out")}
    ptrs.update(Prompt_lens="*i32", Start_pos="*i32", Cos="*fp32", Sin="*fp32")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    const = dict(HEAD_DIM=head_dim, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n,
                 QK_SCALE=scale * 1.4426950408889634, DOT_PRECISION="ieee" if dtype == "float32" else "tf32")
    return _compile(fn, ptrs, ["seq_len", "num_kv_heads", "max_seq"], const, cc,
                    num_warps or default_num_warps(head_dim))


def compile_int4_matmul(
    dtype: str, group_size: int, kernel: Literal["gemv", "gemm"], block_m: int = 64, block_n: int | None = None,
    block_k: int | None = None, cc: int | None = None, num_warps: int | None = None,
) -> AotKernel:
    from ..kernels.int4_matmul import (GEMM_NUM_WARPS, GEMV_BLOCK_N, GEMV_NUM_WARPS, _int4_gemm_kernel,
                                       _int4_gemv_kernel, gemv_tile)

    t = "*" + _TL[dtype]
    ptrs = {"X": t, "QW": "*u8", "Scales": "*fp16", "Y": t}
    if kernel == "gemv":
        block_k, tile_groups = gemv_tile(group_size, block_k)
        const = dict(GROUP_SIZE=group_size, BLOCK_N=block_n or GEMV_BLOCK_N, BLOCK_K=block_k, TILE_GROUPS=tile_groups)
        return _compile(_int4_gemv_kernel, ptrs, ["N", "K", "stride_xm"], const, cc, num_warps or GEMV_NUM_WARPS)
    const = dict(GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n or 64, BLOCK_K=block_k or min(group_size, 64),
                 DOT_PRECISION="ieee" if dtype == "float32" else "tf32")
    return _compile(_int4_gemm_kernel, ptrs, ["M", "N", "K", "stride_xm"], const, cc, num_warps or GEMM_NUM_WARPS)


# ------------------------------------------------------------------------------- QDP registration
def _import_tensorrt():
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise ImportError(
            "TensorRT Python plugins need `tensorrt>=10.9` (pip install 'llava-edge[tensorrt]'); "
            f"it is not importable here ({e}). Export with attention_impl_for(...) == 'standard' instead."
        ) from e
    version = parse_trt_version(trt.__version__)
    if version < AOT_MIN:
        raise RuntimeError(f"TensorRT {trt.__version__} has no AOT Python plugins (needs >= 10.9)")
    return trt, trtp


def _const(expr, what: str) -> int:
    """Shape dims that become constexprs (heads, head_dim) must be static in the ONNX graph."""
    if not getattr(expr, "is_constant", False):
        raise ValueError(f"{what} must be a static dimension for the AOT plugin")
    return int(expr.constant_value)


def _launch(trtp, k: AotKernel, grid: tuple):
    p = trtp.KernelLaunchParams()
    p.grid_x, p.grid_y, p.grid_z = grid
    p.block_x = k.num_warps * 32
    p.shared_mem = k.shared_mem
    return p


def register_plugins(cc: int | None = None) -> None:
    """Register ``llava_edge::{decode_attention, prefill_attention, int4_matmul}`` with TensorRT.

    Call once before parsing an ONNX graph that contains :func:`plugin_node` nodes (engine build).
    Running a built engine needs nothing from here: the PTX is inside the engine. Not exercised in CPU
    CI (no TensorRT there); the kernels and their AOT compilation are.
    """
    trt, trtp = _import_tensorrt()

    dt = {trt.float16: "float16", trt.float32: "float32"}

    # ---- decode attention: out = attention; caches and split-K scratch updated in place (aliased).
    @trtp.register(f"{PLUGIN_NAMESPACE}::decode_attention")
    def _decode_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, seq_lens: trtp.TensorDesc,
                     cos: trtp.TensorDesc, sin: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
                     partial_o: trtp.TensorDesc, partial_ml: trtp.TensorDesc, counters: trtp.TensorDesc,
                     num_splits: int, block_n: int, sm_scale: float):
        return (q.like(), k_cache.aliased(), v_cache.aliased(), partial_o.aliased(), partial_ml.aliased(),
                counters.aliased())

    @trtp.autotune(f"{PLUGIN_NAMESPACE}::decode_attention")
    def _decode_tune(q, k, v, seq_lens, cos, sin, k_cache, v_cache, partial_o, partial_ml, counters, outputs):
        f = "FP16|FP32"
        return [trtp.AutoTuneCombination(f"{f}, {f}, {f}, INT32, FP32, FP32, {f}, {f}, FP32, FP32, INT32, "
                                         f"{f}, {f}, {f}, FP32, FP32, INT32")]

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::decode_attention")
    def _decode_aot(q, k, v, seq_lens, cos, sin, k_cache, v_cache, partial_o, partial_ml, counters,
                    num_splits: int, block_n: int, sm_scale: float, outputs, tactic):
        heads = _const(q.shape_expr[1], "num_heads")
        head_dim = _const(q.shape_expr[2], "head_dim")
        kv_heads = _const(k.shape_expr[1], "num_kv_heads")
        max_seq = _const(k_cache.shape_expr[2], "max_seq")
        kern = compile_decode_attention(dt[q.dtype], head_dim, heads // kv_heads, num_splits, block_n,
                                        sm_scale or None, cc)
        args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(x) for x in (kv_heads, max_seq)])
        return kern.name.encode(), kern.ptx.encode(), _launch(trtp, kern, (q.shape_expr[0], kv_heads, num_splits)), args

    # ---- prefill attention
    @trtp.register(f"{PLUGIN_NAMESPACE}::prefill_attention")
    def _prefill_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, prompt_lens: trtp.TensorDesc,
                      start_pos: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc,
                      k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, block_m: int, block_n: int,
                      sm_scale: float):
        return q.like(), k_cache.aliased(), v_cache.aliased()

    @trtp.autotune(f"{PLUGIN_NAMESPACE}::prefill_attention")
    def _prefill_tune(q, k, v, prompt_lens, start_pos, cos, sin, k_cache, v_cache, outputs):
        f = "FP16|FP32"
        return [trtp.AutoTuneCombination(f"{f}, {f}, {f}, INT32, INT32, FP32, FP32, {f}, {f}, {f}, {f}, {f}")]

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::prefill_attention")
    def _prefill_aot(q, k, v, prompt_lens, start_pos, cos, sin, k_cache, v_cache, block_m: int, block_n: int,
                     sm_scale: float, outputs, tactic):
        heads = _const(q.shape_expr[2], "num_heads")
        head_dim = _const(q.shape_expr[3], "head_dim")
        kv_heads = _const(k.shape_expr[2], "num_kv_heads")
        kern = compile_prefill_attention(dt[q.dtype], head_dim, heads // kv_heads, block_m, block_n,
                                         sm_scale or None, cc)
        seq = q.shape_expr[1]
        args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(x) for x in (seq, kv_heads, k_cache.shape_expr[2])])
        grid = (trtp.cdiv(seq, block_m), q.shape_expr[0] * heads, 1)
        return kern.name.encode(), kern.ptx.encode(), _launch(trtp, kern, grid), args

    # ---- int4 matmul: two tactics (GEMV, GEMM); TensorRT times both for the profile's shapes.
    @trtp.register(f"{PLUGIN_NAMESPACE}::int4_matmul")
    def _int4_desc(x: trtp.TensorDesc, qweight: trtp.TensorDesc, scales: trtp.TensorDesc, group_size: int):
        y = x.like()
        y.shape_expr[-1] = qweight.shape_expr[0]
        return y

    @trtp.autotune(f"{PLUGIN_NAMESPACE}::int4_matmul")
    def _int4_tune(x, qweight, scales, outputs):
        c = trtp.AutoTuneCombination()
        c.pos([0, 3], "FP16|FP32")
        c.pos(1, "INT8")  # uint8 bytes; TensorRT has no uint8 plugin I/O type, the bits are the same
        c.pos(2, "FP16")
        c.tactics([1, 2])
        return [c]

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::int4_matmul")
    def _int4_aot(x, qweight, scales, group_size: int, outputs, tactic):
        n = qweight.shape_expr[0]
        kdim = x.shape_expr[-1]
        m = x.shape_expr.numel() // kdim
        if tactic == 1:
            from ..kernels.int4_matmul import GEMV_BLOCK_N

            kern = compile_int4_matmul(dt[x.dtype], group_size, "gemv", cc=cc)
            args, grid = (n, kdim, kdim), (trtp.cdiv(n, GEMV_BLOCK_N), m, 1)
        else:
            kern = compile_int4_matmul(dt[x.dtype], group_size, "gemm", cc=cc)
            args, grid = (m, n, kdim, kdim), (trtp.cdiv(m, 64), trtp.cdiv(n, 64), 1)
        sym = trtp.SymIntExprs.from_tuple([trtp.SymInt32(a) for a in args])
        return kern.name.encode(), kern.ptx.encode(), _launch(trtp, kern, grid), sym
