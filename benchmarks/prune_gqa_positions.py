"""Does onnxruntime's GroupQueryAttention rotate each token by its own ``position_ids`` entry?

Pruned image tokens keep their original positions (docs/pruning.md, "Positions"), so the fast decoder's
KV cache is filled densely while positions have gaps: cache index != position. GroupQueryAttention takes
an optional ``position_ids`` input (after cos/sin) next to its fused rotary (``do_rotary=1``). This probe
runs one GQA node over a shared in-place KV buffer, as ``export/fast_decoder.py`` wires it, on the steps the
runtime makes (a first prompt alone and as a right-padded ragged batch, a later prompt chunk, a ragged
decode step), with positions that have a gap, and compares its output with numpy's attention at those
positions; and the same for the alternative the fast decoder can use instead: com.microsoft
RotaryEmbedding on q and k with ``position_ids``, then GQA with ``do_rotary=0``.

    python3 benchmarks/prune_gqa_positions.py

Prints one line per (way, step): the largest difference from numpy. A way is exact when every line is
~1e-6. The steps run twice: after a first prompt with a gap, and after one without (so a later step's own
error shows apart from a cache written at wrong positions).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

HEADS, KV_HEADS, D, MAX_LEN, MAX_POS = 4, 2, 16, 32, 64


def tables() -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (10000 ** (np.arange(0, D, 2) / D))
    f = np.outer(np.arange(MAX_POS), inv)
    return np.cos(f).astype(np.float32), np.sin(f).astype(np.float32)


def graph(way: str) -> ort.InferenceSession:
    """way "gqa": GQA do_rotary=1 with position_ids; "rotary": RotaryEmbedding(q), (k), GQA do_rotary=0."""
    cos, sin = tables()
    inits = [helper.make_tensor("cos", TensorProto.FLOAT, cos.shape, cos.ravel()),
             helper.make_tensor("sin", TensorProto.FLOAT, sin.shape, sin.ravel())]
    kv = ["batch", KV_HEADS, MAX_LEN, D]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", "seq", HEADS * D]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, ["batch", "seq", KV_HEADS * D]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, ["batch", "seq", KV_HEADS * D]),
              helper.make_tensor_value_info("past_k", TensorProto.FLOAT, kv),
              helper.make_tensor_value_info("past_v", TensorProto.FLOAT, kv),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
    nodes = []
    q, k = "q", "k"
    if way == "rotary":
        nodes += [helper.make_node("RotaryEmbedding", [x, "position_ids", "cos", "sin"], [x + "r"],
                                   domain="com.microsoft", num_heads=h) for x, h in (("q", HEADS), ("k", KV_HEADS))]
        q, k = "qr", "kr"
        gqa_in = [q, k, "v", "past_k", "past_v", "seqlens_k", "total"]
        rotary = 0
    else:
        gqa_in = [q, k, "v", "past_k", "past_v", "seqlens_k", "total", "cos", "sin", "position_ids"]
        rotary = 1
    nodes.append(helper.make_node("GroupQueryAttention", gqa_in, ["out", "present_k", "present_v"],
                                  domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=rotary,
                                  scale=float(D ** -0.5)))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", HEADS * D]),
               helper.make_tensor_value_info("present_k", TensorProto.FLOAT, kv),
               helper.make_tensor_value_info("present_v", TensorProto.FLOAT, kv)]
    model = helper.make_model(helper.make_graph(nodes, "probe", inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def rotate(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """x [S, H, D] at positions [S] (half-split rotary, as transformers)."""
    cos, sin = tables()
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    a, b = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


class Reference:
    """numpy attention per row over everything appended so far, each token rotated at its own position."""

    def __init__(self, rows: int):
        self.k = [np.zeros((0, KV_HEADS, D), np.float32) for _ in range(rows)]
        self.v = [np.zeros((0, KV_HEADS, D), np.float32) for _ in range(rows)]

    def step(self, r: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> np.ndarray:
        n = len(pos)
        qr = rotate(q.reshape(n, HEADS, D), pos)
        self.k[r] = np.concatenate([self.k[r], rotate(k.reshape(n, KV_HEADS, D), pos)])
        self.v[r] = np.concatenate([self.v[r], v.reshape(n, KV_HEADS, D)])
        total = len(self.k[r])
        out = np.zeros((n, HEADS, D), np.float64)
        for h in range(HEADS):
            kk, vv = self.k[r][:, h // (HEADS // KV_HEADS)], self.v[r][:, h // (HEADS // KV_HEADS)]
            for i in range(n):
                seen = total - n + i + 1  # causal over cache entries
                s = (kk[:seen] @ qr[i, h]) * D ** -0.5
                w = np.exp(s - s.max())
                out[i, h] = (w / w.sum()) @ vv[:seen]
        return out.reshape(n, HEADS * D)


def probe(way: str, gap_in_first: bool = True) -> list[tuple[str, float]]:
    """The runtime's steps in order. ``gap_in_first`` False: the first prompt has consecutive positions (what
    any rotary gets right), so a wrong later step is that step's own doing, not a wrong cache."""
    sess = graph(way)
    rng = np.random.default_rng(0)
    rows = 2
    pk = np.zeros((rows, KV_HEADS, MAX_LEN, D), np.float32)
    pv = np.zeros_like(pk)
    lengths = np.zeros(rows, np.int32)
    ref = Reference(rows)
    results = []

    def run(name: str, tokens: list[int], positions: list[np.ndarray], row_ids: list[int]) -> None:
        """One call over ``row_ids`` (rows of the shared buffer, from 0): row j appends tokens[j] tokens at
        positions[j]; right-padded to the longest."""
        nonlocal pk, pv
        b, s = len(row_ids), max(tokens)
        q = np.zeros((b, s, HEADS * D), np.float32)
        k = np.zeros((b, s, KV_HEADS * D), np.float32)
        v = np.zeros_like(k)
        pos = np.zeros((b, s), np.int64)
        for j, n in enumerate(tokens):
            q[j, :n] = rng.standard_normal((n, HEADS * D))
            k[j, :n] = rng.standard_normal((n, KV_HEADS * D))
            v[j, :n] = rng.standard_normal((n, KV_HEADS * D))
            pos[j, :n] = positions[j]
        new = lengths[:b] + np.array(tokens, np.int32)
        feeds = {"q": q, "k": k, "v": v, "past_k": pk[:b], "past_v": pv[:b], "seqlens_k": (new - 1).astype(np.int32),
                 "total": np.array(int(new.max()), np.int32), "position_ids": pos}
        out, ok, ov = sess.run(None, feeds)
        pk[:b], pv[:b] = ok, ov
        lengths[:b] = new
        err = max(float(np.abs(out[j, :n] - ref.step(r, q[j, :n], k[j, :n], v[j, :n], positions[j])).max())
                  for j, (n, r) in enumerate(zip(tokens, row_ids)))
        results.append((name, err))

    gap = np.array([0, 1, 2, 9, 10])  # a pruned image: tokens 3..8 dropped, the rest keep their positions
    if gap_in_first:
        run("first prompt, batch 2 ragged", [5, 3], [gap, np.array([0, 4, 5])], [0, 1])
    else:
        run("first prompt, batch 2 ragged", [5, 3], [np.arange(5), np.arange(3)], [0, 1])
    run("decode, batch 2 ragged", [1, 1], [np.array([11]), np.array([6])], [0, 1])
    # a later prompt chunk goes in one row at a time (slot prefill): batch 1 over row 0
    run("later prompt chunk (batch 1)", [3], [np.array([14, 15, 16])], [0])
    run("decode after the chunk", [1, 1], [np.array([17]), np.array([7])], [0, 1])
    return results


def first_prompt_alone(way: str) -> float:
    """Batch 1, a first prompt with a gap: the case a fresh slot's first chunk is."""
    sess = graph(way)
    rng = np.random.default_rng(1)
    n, pos = 5, np.array([[0, 1, 6, 7, 8]])
    q = rng.standard_normal((1, n, HEADS * D)).astype(np.float32)
    k = rng.standard_normal((1, n, KV_HEADS * D)).astype(np.float32)
    v = rng.standard_normal((1, n, KV_HEADS * D)).astype(np.float32)
    z = np.zeros((1, KV_HEADS, MAX_LEN, D), np.float32)
    out = sess.run(None, {"q": q, "k": k, "v": v, "past_k": z, "past_v": z.copy(),
                          "seqlens_k": np.array([n - 1], np.int32), "total": np.array(n, np.int32),
                          "position_ids": pos})[0]
    return float(np.abs(out[0] - Reference(1).step(0, q[0], k[0], v[0], pos[0])).max())


def main() -> None:
    print(f"onnxruntime {ort.__version__}")
    for way in ("gqa", "rotary"):
        print(f"{way}: first prompt alone (batch 1): max |diff| {first_prompt_alone(way):.2e}")
        for gap in (True, False):
            for name, err in probe(way, gap):
                print(f"{way}: {name}{'' if gap else ' (first prompt without a gap)'}: max |diff| {err:.2e}")


if __name__ == "__main__":
    main()
