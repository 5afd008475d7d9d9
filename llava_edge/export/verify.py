"""Numerical checks of exported graphs: each graph against its torch module, and the whole split
pipeline against transformers' LlavaForConditionalGeneration forward."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch

from .onnx_export import ExportedGraph


def session(path: Path) -> ort.InferenceSession:
    """A CPU session for a check. fp16 graphs run without graph optimizations: onnxruntime's CPU provider
    casts fp16 weights to fp32 for its kernels, and constant folding would keep an fp32 copy of every
    weight (a 7B fp16 decoder: 13 + 26 GB); unfolded, each cast lives for one node."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    graph = onnx.load(str(path), load_external_data=False)
    if any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in graph.graph.input):
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    del graph
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def torch_outputs(graph: ExportedGraph, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """The torch module's outputs on `inputs`, as numpy: the reference an ONNX graph is compared with
    once the torch model is gone (see onnx_error)."""
    with torch.no_grad():
        want = graph.module(*inputs)
    if isinstance(want, torch.Tensor):
        want = (want,)
    return [w.numpy() for w in want]


def onnx_error(package_dir: Path, spec, inputs: tuple[torch.Tensor, ...], want: list[np.ndarray],
               relative: bool = False) -> float:
    """Run the ONNX graph on `inputs`; the largest difference from the torch outputs `want` (relative:
    the largest max_relative_error, for graphs whose weights were rounded on purpose)."""
    sess = session(package_dir / spec.file)
    got = sess.run(None, {s.name: t.numpy() for s, t in zip(spec.inputs, inputs)})
    if relative:
        return max(max_relative_error(g.astype(np.float64), w.astype(np.float64)) for g, w in zip(got, want))
    return float(max(np.abs(g.astype(np.float64) - w.astype(np.float64)).max() for g, w in zip(got, want)))


def max_abs_error(graph: ExportedGraph, package_dir: Path, inputs: tuple[torch.Tensor, ...]) -> float:
    """Run the ONNX graph and its torch module on the same inputs; return the largest difference."""
    return onnx_error(package_dir, graph.spec, inputs, torch_outputs(graph, inputs))


def random_inputs(graph_name: str, graph: ExportedGraph, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs with shapes unlike the export example (other batch, lengths, a padded row), so that a
    dimension the tracer wrongly fixed shows up as an error here rather than at run time."""
    g = torch.Generator().manual_seed(seed)
    ex = graph.example
    if graph_name == "vision":
        return (torch.randn((3, *ex[0].shape[1:]), generator=g).to(ex[0].dtype),)
    if graph_name == "embed":
        vocab = graph.module.embed_tokens.num_embeddings
        return (torch.randint(0, vocab, (3, 5), generator=g),)
    b, t, p = 3, 2, 6
    hidden = ex[0].shape[-1]
    kv_shape = ex[3].shape
    mask = torch.ones(b, p + t, dtype=torch.int64)
    mask[1, :3] = 0  # a left-padded row
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
    past = [torch.randn((b, kv_shape[1], p, kv_shape[3]), generator=g).to(ex[0].dtype) for _ in ex[3:]]
    return (torch.randn((b, t, hidden), generator=g).to(ex[0].dtype), mask, pos, *past)


@dataclass
class PromptReference:
    """transformers' logits on one prompt with an image, and the inputs_embeds our vision and embed graphs
    make for it: what the decoder graphs are checked against once the torch model is gone."""

    input_ids: np.ndarray  # [1, T]
    inputs_embeds: np.ndarray  # [1, T, H], image features spliced in
    logits: np.ndarray  # [1, T, V] float32, transformers' full forward


def image_prompt_reference(llava, tokenizer, image_token_id: int, num_image_tokens: int, package_dir: Path,
                           image_size: int, seed: int = 0, vision=None) -> PromptReference:
    """transformers' full LLaVA forward on one prompt with an image, and the same prompt through our
    vision and embed graphs. For LLaVA-NeXT (vision.anyres) also the tiling, unpadding and newlines
    (runtime/anyres.py), on an odd-size landscape image."""
    from ..runtime import anyres

    g = torch.Generator().manual_seed(seed)
    vision_sess = session(package_dir / "vision.onnx")
    feat_dtype = vision_sess.get_inputs()[0].type
    np_dtype = np.float16 if "float16" in feat_dtype else np.float32
    hf_kwargs = {}
    if vision is not None and vision.anyres:
        rgb = torch.randint(0, 256, (45, 70, 3), generator=g, dtype=torch.uint8).numpy()
        tiles, size = anyres.image_tiles(rgb, vision)
        pixel = torch.from_numpy(tiles)
        feats = anyres.pack_image_features(vision_sess.run(None, {"pixel_values": tiles.astype(np_dtype)})[0], size,
                                           vision)
        num_image_tokens = feats.shape[0]
        hf_kwargs = {"pixel_values": pixel[None], "image_sizes": torch.tensor([size])}
    else:
        pixel = torch.randn((1, 3, image_size, image_size), generator=g)
        feats = vision_sess.run(None, {"pixel_values": pixel.numpy().astype(np_dtype)})[0][0]
        hf_kwargs = {"pixel_values": pixel}
    del vision_sess
    text_ids = tokenizer.encode("USER: describe the picture ASSISTANT:").ids
    ids = [text_ids[0]] + [image_token_id] * num_image_tokens + text_ids[1:]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        want = llava(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **hf_kwargs).logits

    # text rows from torch's own table: the embed graph has its own check (exact, or int8 within its bound),
    # and the decoder checks below must see the float table's rows whatever the package stores
    with torch.no_grad():
        emb = llava.get_input_embeddings()(input_ids).float().numpy().astype(np_dtype)
    emb[0, 1 : 1 + num_image_tokens] = feats
    return PromptReference(input_ids.numpy(), emb, want.float().numpy())


def portable_logits_error(package_dir: Path, ref: PromptReference, decoder: str = "decoder.onnx") -> float:
    """The split pipeline (vision -> splice -> portable decoder) vs transformers' logits on ref's prompt.
    This is the check that catches a wrong feature layer, select strategy or projector."""
    sess = session(package_dir / decoder)
    n = ref.input_ids.shape[1]
    feeds = {"inputs_embeds": ref.inputs_embeds, "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None]}
    for inp in sess.get_inputs()[3:]:
        kv = inp.shape
        feeds[inp.name] = np.zeros((1, kv[1], 0, kv[3]), ref.inputs_embeds.dtype)
    got = sess.run(["logits"], feeds)[0]
    return float(np.abs(got.astype(np.float64) - ref.logits.astype(np.float64)).max())


def pipeline_logits_error(llava, tokenizer, image_token_id: int, num_image_tokens: int, package_dir: Path,
                          image_size: int, seed: int = 0, vision=None) -> float:
    """transformers' full LLaVA forward vs our split graphs on one prompt with an image (both steps above)."""
    ref = image_prompt_reference(llava, tokenizer, image_token_id, num_image_tokens, package_dir, image_size, seed,
                                 vision)
    return portable_logits_error(package_dir, ref)


def fast_decoder_logits(manifest, package_dir: Path, graph: str, ref: PromptReference,
                        decode_steps: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A fast decoder graph (GroupQueryAttention, in-place cache) on ref's prompt, driven by the
    runtime's own FastOrtBackend: the prompt is prefilled but for its last ``decode_steps`` tokens,
    which then go in one per step, so the prefill and the decode path both produce logits. Returns
    (the graph's logits at those decode_steps + 1 positions [P,V], transformers' there [P,V])."""
    from ..runtime.fast_backend import FastOrtBackend

    emb = ref.inputs_embeds
    n = emb.shape[1]
    p = n - decode_steps
    backend = FastOrtBackend(package_dir, manifest, decoder=graph)
    cache = backend.new_cache(1, n)
    rows = [backend.step(cache, emb[:, :p], np.ones((1, p), np.int64), np.arange(p, dtype=np.int64)[None])[0]]
    for i in range(p, n):
        rows.append(backend.step(cache, emb[:, i:i + 1], np.ones((1, i + 1), np.int64), np.array([[i]], np.int64))[0])
    return np.stack(rows).astype(np.float64), ref.logits[0, p - 1:].astype(np.float64)


def _initializer_bytes(graph_path: Path, tensor: onnx.TensorProto, chunk: int = 64 << 20):
    """An initializer's stored bytes, in chunks (inline, or from its external data file)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        yield onnx.numpy_helper.to_array(tensor).tobytes()
        return
    info = {e.key: e.value for e in tensor.external_data}
    with open(graph_path.parent / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        left = int(info["length"])
        while left:
            data = f.read(min(chunk, left))
            if not data:
                raise ValueError(f"{info['location']} ends inside {tensor.name}")
            left -= len(data)
            yield data


def _digest(graph_path: Path, tensor: onnx.TensorProto) -> str:
    h = hashlib.sha256()
    for data in _initializer_bytes(graph_path, tensor):
        h.update(data)
    return h.hexdigest()


def weights_not_in(package_dir: Path, part, whole) -> list[str]:
    """Initializers of graph `part` that graph `whole` lacks or stores differently (same name, same
    dtype, shape and bytes required). A graph built from a model's first layers against the whole
    model's: empty when the whole graph holds exactly the weights that were checked."""
    part_path, whole_path = package_dir / part.file, package_dir / whole.file
    theirs = {t.name: t for t in onnx.load(str(whole_path), load_external_data=False).graph.initializer}
    differ = []
    for t in onnx.load(str(part_path), load_external_data=False).graph.initializer:
        other = theirs.get(t.name)
        if other is None or other.data_type != t.data_type or list(other.dims) != list(t.dims):
            differ.append(t.name)
            continue
        if _digest(part_path, t) != _digest(whole_path, other):
            differ.append(t.name)
    return differ


def max_relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max over rows of ||got - want|| / ||want||."""
    return float((np.linalg.norm(got - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-12)).max())


def hf_greedy_tokens(llava, pipeline, images, questions, max_new_tokens: int) -> list[list[int]]:
    """transformers' `generate(do_sample=False)` on the runtime's own token ids and pixels, left-padded
    as the runtime pads; each row cut after its first eos. The reference the runtime must reproduce."""
    from ..runtime.pipeline import Request
    from ..runtime.preprocess import preprocess

    enc = [pipeline.encode_request(Request([(q, None)], [im])) for q, im in zip(questions, images)]
    longest = max(len(e) for e in enc)
    pad = pipeline.manifest.text.pad_token_id
    ids = torch.full((len(enc), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), longest), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, longest - len(e):] = torch.from_numpy(e)
        mask[i, longest - len(e):] = 1
    pixels = torch.from_numpy(np.stack([preprocess(im, pipeline.manifest.vision) for im in images]))
    with torch.no_grad():
        out = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
    eos = set(pipeline.manifest.text.eos_token_ids)
    rows = []
    for row in out[:, longest:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows
