"""torch -> ONNX for the three graphs, with the names and dynamic dims of the graph contract.

We use torch's TorchScript exporter (dynamo=False): on our hand-written modules it emits plain
opset-17 ops (MatMul, Softmax, ...) that every onnxruntime and TensorRT >= 8.6 reads, exports a tiny
model in well under a second, and supports symbolic dims by name. The dynamo exporter also works on
these modules but takes ~10x longer and fixes size-1 example dims. Revisit when the TorchScript
exporter is removed from torch.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

# The IR version clamp, the >1 GiB external-data threshold and the writer are defined once, in onnx_io.
from ..onnx_io import EXTERNAL_DATA_THRESHOLD, MAX_IR_VERSION, save_onnx  # noqa: F401 (re-exported)
from ..package import GraphSpec, TensorSpec
from .embed_int8 import int8_embed_model
from .graphs import Decoder, TokenEmbedding, VisionEncoder

# The embedding table goes to its data file much earlier. onnxruntime keeps an inline graph's protobuf
# resident beside its tensors, while a page-aligned data file is mapped and a gather touches only the rows
# it reads: edge-1b's fp32 table (262 MB) added 264 MB to a process inline and 20 MB from a data file,
# its 8-bit table 78 MB and 15 MB (docs/cpu.md). Small tables (the test models') stay in one file.
EMBED_EXTERNAL_THRESHOLD = 16 << 20

_NP_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


@dataclass
class ExportedGraph:
    spec: GraphSpec
    module: torch.nn.Module  # kept for verification
    example: tuple


def _finish(raw_path: Path, model_path: Path, size_hint: int, threshold: int | None = None) -> list[str]:
    """Clamp the IR version, give the decoder's weights stable names, move big weights out of line.

    raw_path is torch's output in a scratch directory: above 2 GB the TorchScript exporter writes one
    external file per tensor next to it, which must not end up in the package. The graph is read without
    its weights and they are copied into the one data file a tensor at a time, so a 7B decoder is never
    in memory twice (beside the torch model)."""
    model = onnx.load(str(raw_path), load_external_data=False)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    _name_matmul_weights(model)
    return _save_graph(model, raw_path.parent, model_path,
                       size_hint > (EXTERNAL_DATA_THRESHOLD if threshold is None else threshold))


def _save_graph(model: onnx.ModelProto, src_dir: Path, path: Path, external: bool) -> list[str]:
    """Inline when not `external` and no weight already lives in a file, else every weight of >= 1 KiB in
    a page-aligned `<name>.data` (_save_streamed). Returns the external files written."""
    if not external and not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return save_onnx(model, path, external=False)
    return _save_streamed(model, src_dir, path)


def _save_streamed(model: onnx.ModelProto, src_dir: Path, path: Path, align: int = 4096) -> list[str]:
    """Write `model` with every initializer of >= 1 KiB in `<name>.data` (page-aligned offsets), copying
    weights that live in files under src_dir one tensor at a time."""
    location = path.name + ".data"
    for f in path.parent.glob(path.name + "*.data"):
        f.unlink()
    offset = 0
    with open(path.parent / location, "wb") as out:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                with open(src_dir / info["location"], "rb") as f:
                    f.seek(int(info.get("offset", 0)))
                    data = f.read(int(info["length"])) if "length" in info else f.read()
            elif t.HasField("raw_data") and len(t.raw_data) >= 1024:
                data = t.raw_data
            else:
                continue
            pad = (-offset) % align
            out.write(b"\0" * pad)
            offset += pad
            out.write(data)
            t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(data)
            del data
    onnx.save_model(model, str(path))
    return [location]


def _name_matmul_weights(model: onnx.ModelProto) -> None:
    """'/layers.3/mlp/up_proj/MatMul' reads 'onnx::MatMul_512' -> 'layers.3.mlp.up_proj.weight_t'.

    The TorchScript exporter folds Linear's transpose into an anonymous initializer; the quantizer and
    the TensorRT builder find weights by these names instead. weight_t is [in, out]."""
    inits = {i.name: i for i in model.graph.initializer}
    renames: dict[str, str] = {}
    for node in model.graph.node:
        if (node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits
                and node.name.endswith("/MatMul")):
            new = node.name.strip("/")[: -len("/MatMul")].replace("/", ".") + ".weight_t"
            if node.input[1] not in renames and new not in inits:
                renames[node.input[1]] = new
    for old, new in renames.items():
        inits[old].name = new
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def _spec(path: Path, names_in, tensors_in, dyn_in, names_out, tensors_out, dyn_out, external) -> GraphSpec:
    def shape(t: torch.Tensor, dyn: dict[int, str]) -> list[int | str]:
        return [dyn.get(i, int(s)) for i, s in enumerate(t.shape)]

    return GraphSpec(
        file=path.name,
        inputs=[TensorSpec(n, _NP_DTYPES[t.dtype], shape(t, dyn_in.get(n, {}))) for n, t in zip(names_in, tensors_in)],
        outputs=[TensorSpec(n, _NP_DTYPES[t.dtype], shape(t, dyn_out.get(n, {})))
                 for n, t in zip(names_out, tensors_out)],
        external_data=external,
    )


def _export(module, example, path: Path, names_in, names_out, dyn_in, dyn_out, opset: int,
            external_threshold: int | None = None) -> GraphSpec:
    dynamic_axes = {**dyn_in, **dyn_out}
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.stem}-raw-", dir=path.parent))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            outputs = module(*example)
            if isinstance(outputs, torch.Tensor):
                outputs = (outputs,)
            torch.onnx.export(
                module, example, str(scratch / path.name), input_names=names_in, output_names=names_out,
                dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True,
            )
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        external = _finish(scratch / path.name, path, size, external_threshold)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _spec(path, names_in, example, dyn_in, names_out, outputs, dyn_out, external)


def export_vision(llava, vision_cfg, out_dir: Path, dtype: torch.dtype, opset: int) -> ExportedGraph:
    module = VisionEncoder(llava, vision_cfg.vision_feature_layer, vision_cfg.select_strategy).eval()
    s = vision_cfg.image_size
    example = (torch.randn(2, 3, s, s, dtype=dtype),)
    spec = _export(module, example, out_dir / "vision.onnx", ["pixel_values"], ["image_features"],
                   {"pixel_values": {0: "batch"}}, {"image_features": {0: "batch"}}, opset)
    return ExportedGraph(spec, module, example)


def export_embed(llava, out_dir: Path, opset: int, int8: bool = False) -> ExportedGraph:
    """The embed graph: traced from torch, or (int8) written directly as one GatherBlockQuantized node over
    the table's 8-bit rows (export/embed_int8.py); same inputs and outputs either way."""
    module = TokenEmbedding(llava).eval()
    example = (torch.tensor([[1, 5, 9], [1, 7, 3]], dtype=torch.int64),)
    path = out_dir / "embed.onnx"
    dyn_in, dyn_out = {"input_ids": {0: "batch", 1: "seq"}}, {"inputs_embeds": {0: "batch", 1: "seq"}}
    if not int8:
        spec = _export(module, example, path, ["input_ids"], ["inputs_embeds"], dyn_in, dyn_out, opset,
                       external_threshold=EMBED_EXTERNAL_THRESHOLD)
        return ExportedGraph(spec, module, example)
    weight = module.embed_tokens.weight
    model = int8_embed_model(weight.detach().float().numpy(), _NP_DTYPES[weight.dtype])
    table = sum(len(t.raw_data) for t in model.graph.initializer)
    external = _save_graph(model, out_dir, path, table > EMBED_EXTERNAL_THRESHOLD)
    with torch.no_grad():
        out = module(*example)
    return ExportedGraph(_spec(path, ["input_ids"], example, dyn_in, ["inputs_embeds"], (out,), dyn_out, external),
                         module, example)


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *present]


def export_decoder(llava, out_dir: Path, dtype: torch.dtype, opset: int) -> ExportedGraph:
    module = Decoder(llava).eval()
    n_layers = len(module.layers)
    names_in, names_out = decoder_io_names(n_layers)
    hidden = llava.config.text_config.hidden_size
    b, t, p = 2, 3, 4  # sizes > 1 so that the tracer cannot specialise them
    example = (
        torch.randn(b, t, hidden, dtype=dtype),
        torch.ones(b, p + t, dtype=torch.int64),
        torch.arange(p, p + t, dtype=torch.int64).unsqueeze(0).repeat(b, 1),
        *[torch.randn(b, module.num_kv_heads, p, module.head_dim, dtype=dtype) for _ in range(2 * n_layers)],
    )
    dyn_in = {
        "inputs_embeds": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total_seq"},
        "position_ids": {0: "batch", 1: "seq"},
        **{n: {0: "batch", 2: "past_seq"} for n in names_in[3:]},
    }
    dyn_out = {"logits": {0: "batch", 1: "seq"}, **{n: {0: "batch", 2: "total_seq"} for n in names_out[1:]}}
    spec = _export(module, example, out_dir / "decoder.onnx", names_in, names_out, dyn_in, dyn_out, opset)
    return ExportedGraph(spec, module, example)
