"""A fake ``tensorrt`` + ``cuda-python`` for the TensorRT backend's tests on CPU.

The fakes run the package's ONNX graphs with onnxruntime on host memory, behind the TensorRT calls the
backend makes (profiles, set_input_shape, set_tensor_address, execute_async_v3, cudaMemcpy*), and
enforce what TensorRT would: input shapes inside the active profile, copies in the right direction,
outputs not larger than their buffers. This tests OUR buffer handling (profile switching, ping-pong KV
slabs, the in-place cache and its scatter copies, pinned staging, last-position logits via
cudaMemcpy2D, CUDA graph capture and replay), not TensorRT.

Fake CUDA memory and graphs behave like the real ones where it matters here: cudaMalloc returns NaN
garbage (not zeros), and work issued on a stream while it is being captured is recorded, not run: a
captured graph replays it later with the shapes and addresses of the capture.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from llava_edge import trt_env
from llava_edge.trt.plan import plan_build, plugin_config
from llava_edge.trt.plugin_decoder import write_plugin_decoder
from llava_edge.trt.static_decoder import write_static_decoder
from llava_edge.contract import KV_INPLACE, RECORD_FORMAT, RECORD_NAME, EngineFile, EngineRecord
from llava_edge.package import load_manifest
from llava_edge.runtime.trt_backend import TrtBackend

__all__ = ["CHUNK", "BATCHES", "FakeCudart", "fake_trt", "fake_package", "open_fake", "generate"]

CHUNK = 8
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32}


class FakeGraph:
    def __init__(self, work: list) -> None:
        self.work = work


class FakeCudart:
    class cudaMemcpyKind:  # noqa: N801 - cuda-python's names
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeGlobal = 0

    def __init__(self, fail_capture: str | None = None) -> None:
        self.device: dict[int, ctypes.Array] = {}
        self.pinned: dict[int, ctypes.Array] = {}
        self.mallocs = 0
        self.fail_capture = fail_capture  # "begin" | "execute" | "instantiate": where capture fails
        self.capturing: list | None = None  # work recorded while the stream is captured
        self.captures = self.launches = 0
        self.live_graphs: set[int] = set()
        self.d2d_bytes = 0

    def record_or_run(self, fn) -> None:
        if self.capturing is not None:
            self.capturing.append(fn)
        else:
            fn()

    def _region(self, table, addr: int, n: int) -> bool:
        return any(a <= addr and addr + n <= a + len(b) for a, b in table.items())

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetDeviceProperties(self, i):
        return 0, types.SimpleNamespace(name=b"FakeGPU", major=8, minor=7, totalGlobalMem=8 << 30)

    def cudaSetDevice(self, i):
        return (0,)

    def cudaMalloc(self, n):
        self.mallocs += 1
        b = ctypes.create_string_buffer(n)
        ctypes.memset(b, 0xFF, n)  # uninitialised device memory: NaN as float
        self.device[ctypes.addressof(b)] = b
        return 0, ctypes.addressof(b)

    def cudaMemset(self, p, value, n):
        assert self._region(self.device, p, n)
        ctypes.memset(p, value, n)
        return (0,)

    def cudaMallocHost(self, n):
        b = ctypes.create_string_buffer(n)
        self.pinned[ctypes.addressof(b)] = b
        return 0, ctypes.addressof(b)

    def cudaFree(self, p):
        self.device.pop(p)
        return (0,)

    def cudaFreeHost(self, p):
        self.pinned.pop(p)
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamDestroy(self, s):
        return (0,)

    def cudaStreamSynchronize(self, s):
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        k = self.cudaMemcpyKind
        src_mem = self.pinned if kind == k.cudaMemcpyHostToDevice else self.device
        dst_mem = self.pinned if kind == k.cudaMemcpyDeviceToHost else self.device
        assert self._region(src_mem, src, n), "copy source not in the right memory"
        assert self._region(dst_mem, dst, n), "copy destination not in the right memory"
        if kind == k.cudaMemcpyDeviceToDevice:
            self.d2d_bytes += n
        self.record_or_run(lambda: ctypes.memmove(dst, src, n))
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        assert width <= dpitch and width <= spitch
        for r in range(height):
            self.cudaMemcpyAsync(dst + r * dpitch, src + r * spitch, width, kind, stream)
        return (0,)

    # -- CUDA graphs: capture records the stream's work, launch replays it
    def cudaStreamBeginCapture(self, stream, mode):
        assert self.capturing is None, "capture already in progress"
        if self.fail_capture == "begin":
            return (900,)
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        assert self.capturing is not None
        graph, self.capturing = FakeGraph(self.capturing), None
        self.live_graphs.add(id(graph))
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        if self.fail_capture == "instantiate":
            return 999, None
        self.captures += 1
        exe = FakeGraph(list(graph.work))
        self.live_graphs.add(id(exe))
        return 0, exe

    def cudaGraphLaunch(self, exe, stream):
        assert self.capturing is None and id(exe) in self.live_graphs
        self.launches += 1
        for fn in exe.work:
            fn()
        return (0,)

    def cudaGraphDestroy(self, graph):
        self.live_graphs.discard(id(graph))
        return (0,)

    def cudaGraphExecDestroy(self, exe):
        self.live_graphs.discard(id(exe))
        return (0,)


class FakeContext:
    def __init__(self, eng: "FakeEngine") -> None:
        self.eng, self.profile, self.shapes, self.addr = eng, 0, {}, {}
        self.runs: list[tuple[int, tuple]] = []  # (profile, inputs_embeds shape) of every execution
        self.lengths: list[dict[str, list[int]]] = []  # plugin engines: prompt_lens/start_pos of every execution
        self.replays = 0  # of those, how many came from a graph launch

    def set_optimization_profile_async(self, p, stream):
        self.profile = p
        return True

    def set_input_shape(self, name, shape):
        mn, _, mx = self.eng.profiles[self.profile][name]
        shape = tuple(shape)
        assert all(a <= s <= b for a, s, b in zip(mn, shape, mx)), f"{name} {shape} outside profile {self.profile}"
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name):
        if name in self.eng.inputs:
            return self.shapes[name]
        d = self.eng.dims
        if name == "logits":
            b, t, _ = self.shapes["inputs_embeds"]
            return (b, t, d["vocab"])
        if name in self.eng.aliases:  # plugin engines: present.* is its past input, same shape
            return self.shapes[self.eng.aliases[name]]
        if name.startswith("present."):
            b, t, _ = self.shapes["inputs_embeds"]
            return (b, d["kvh"], self.shapes["past_key_values.0.key"][2] + t, d["hd"])
        if name.startswith("new."):
            b, t, _ = self.shapes["inputs_embeds"]
            return (b, d["kvh"], t, d["hd"])
        if name == "image_features":
            return (self.shapes["pixel_values"][0], d["n_img"], d["hidden"])
        return (*self.shapes["input_ids"], d["hidden"])

    def set_tensor_address(self, name, addr):
        self.addr[name] = addr
        return True

    def execute_async_v3(self, stream):
        cudart = self.eng.cudart
        if cudart is not None and cudart.capturing is not None:
            if cudart.fail_capture == "execute":
                return False
            # what a captured graph holds: these kernels with these shapes and addresses
            shapes, addr, profile = dict(self.shapes), dict(self.addr), self.profile
            cudart.capturing.append(lambda: self._run(shapes, addr, profile, replay=True))
            return True
        self._run(self.shapes, self.addr, self.profile)
        return True

    def _run(self, shapes, addr, profile, replay=False):
        feeds = {}
        aliased = {i: o for o, i in self.eng.aliases.items()}
        for n in self.eng.inputs:
            dt, shape = np.dtype(self.eng.dtypes[n]), shapes[n]
            nbytes = int(np.prod(shape)) * dt.itemsize
            if n in aliased:  # the plugin updates this input in place: hand it the device memory itself
                assert addr[aliased[n]] == addr[n], f"{aliased[n]} must be bound to {n}'s buffer (aliased I/O)"
                mem = (ctypes.c_char * nbytes).from_address(addr[n])
                feeds[n] = np.frombuffer(mem, dt).reshape(shape)
                self.eng.in_place_bytes += nbytes
            else:
                feeds[n] = (np.frombuffer(ctypes.string_at(addr[n], nbytes), dt).reshape(shape) if nbytes
                            else np.zeros(shape, dt))
        outs = self.eng.run(feeds)
        saved, self.shapes = self.shapes, shapes
        for n, o in zip(self.eng.outputs, outs):
            assert o.shape == tuple(self.get_tensor_shape(n)), n
            if n in self.eng.aliases:
                assert o is feeds[self.eng.aliases[n]], f"{n} is not its input's buffer"
                continue  # already in place
            o = np.ascontiguousarray(o)
            ctypes.memmove(addr[n], o.ctypes.data, o.nbytes)
        self.shapes = saved
        self.runs.append((profile, shapes["inputs_embeds"] if "inputs_embeds" in shapes else ()))
        if "prompt_lens" in feeds:
            self.lengths.append({n: feeds[n].tolist() for n in ("prompt_lens", "start_pos")})
        self.replays += replay


class FakeEngine:
    """A 'plan': the ONNX graph it names, run by onnxruntime, or for a plugin-attention graph
    (``"plugin": true``) by ``kernels.onnx_eval.PluginGraphRunner`` (the plugin nodes as the torch
    references, or the Triton kernels with ``"impl": "triton"`` under TRITON_INTERPRET=1). Plugin
    engines alias ``present.*`` to ``past_key_values.*`` as TensorRT's aliased plugin I/O does."""

    def __init__(self, spec: dict, cudart: FakeCudart | None = None) -> None:
        self.cudart = cudart
        self.aliases: dict[str, str] = {}  # output -> the input it aliases
        self.in_place_bytes = 0  # cache bytes the plugin got as device memory (not a copy)
        if spec.get("plugin"):
            import onnx
            from onnx import helper

            from llava_edge.kernels.onnx_eval import PluginGraphRunner

            model = onnx.load(spec["onnx"])
            runner = PluginGraphRunner(model, spec.get("impl", "reference"))
            self.inputs = [i.name for i in model.graph.input]
            self.outputs = list(runner.output_names)
            self.dtypes = {v.name: np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
                           for v in [*model.graph.input, *model.graph.output]}
            self.aliases = {o: o.replace("present.", "past_key_values.")
                            for o in self.outputs if o.startswith("present.")}
            self.run = lambda feeds: self._outputs(runner.run(feeds))  # one pass (the plugin writes in place)
        else:
            self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.outputs = [o.name for o in self.session.get_outputs()]
            self.dtypes = {i.name: _NP[i.type] for i in [*self.session.get_inputs(), *self.session.get_outputs()]}
            self.run = lambda feeds: self.session.run(None, feeds)
        self.profiles = [{k: tuple(tuple(s) for s in v) for k, v in p["shapes"].items()} for p in spec["profiles"]]
        self.dims = spec["dims"]
        self.num_io_tensors = len(self.inputs) + len(self.outputs)
        self.num_optimization_profiles = len(self.profiles)
        self.contexts: list[FakeContext] = []

    def _outputs(self, got: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [got[n] for n in self.outputs]

    def get_tensor_name(self, i):
        return [*self.inputs, *self.outputs][i]

    def get_tensor_mode(self, n):
        return "in" if n in self.inputs else "out"

    def get_tensor_dtype(self, n):
        return self.dtypes[n]

    def get_tensor_profile_shape(self, n, p):
        return self.profiles[p][n]

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_trt(cudart: FakeCudart | None = None, version: str = "10.3.0.30"):
    m = types.ModuleType("fake_tensorrt")
    m.__version__ = version
    m.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    m.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    m.nptype = lambda dt: dt
    m.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                     "deserialize_cuda_engine":
                                         lambda self, buf: FakeEngine(json.loads(bytes(buf)), cudart)})
    return m


def fake_package(trt_package, tmp_path: Path, kv_cache: str, plugins: str = "off",
                  version: str = "10.3.0.30", impl: str = "reference") -> tuple[Path, object]:
    """A package copy with fake 'plans' (JSON naming the ONNX graph and plan_build's profiles). In-place:
    the decoder 'engine' runs the static-cache graph derived from the package's decoder, as the builder
    does, or (``plugins="on"``, TensorRT >= 10.9) the plugin-attention graph; the record still names
    decoder.onnx as its source and says which attention the plan chose."""
    pkg = tmp_path / f"pkg-{kv_cache}-{plugins}"
    shutil.copytree(trt_package, pkg)
    m = load_manifest(pkg)
    plan = plan_build(pkg, version, "orin-agx", max_batch=2, max_context=96, kv_cache=kv_cache, plugins=plugins)
    (pkg / "engines").mkdir()
    t = m.text
    dims = {"vocab": t.vocab_size, "kvh": t.num_kv_heads, "hd": t.head_dim, "hidden": t.hidden_size,
            "n_img": m.vision.num_image_tokens}
    files = {}
    for name in ("vision", "embed", "decoder"):
        onnx_path = pkg / m.graphs[name].file
        spec = {"onnx": str(onnx_path), "profiles": [p.as_dict() for p in plan.profiles[name]], "dims": dims}
        if name == "decoder" and plan.decoder_graph == "plugin":
            spec["onnx"] = str(write_plugin_decoder(onnx_path, pkg / "decoder_plugin.onnx", t.num_heads, t.num_kv_heads,
                                                    t.head_dim, plugin_config(m)))
            spec["plugin"], spec["impl"] = True, impl
        elif name == "decoder" and kv_cache == KV_INPLACE:
            spec["onnx"] = str(write_static_decoder(onnx_path, pkg / "decoder_static.onnx"))
        data = json.dumps(spec).encode()
        (pkg / "engines" / f"{name}.plan").write_bytes(data)
        files[name] = EngineFile(f"engines/{name}.plan", m.graphs[name].file, m.graphs[name].size_bytes, len(data),
                                    m.dtype, spec["profiles"])
    rec = EngineRecord(RECORD_FORMAT, version, "FakeGPU", "8.7", "orin-agx", {}, plan.attention,
                          sorted(plan.checks["decoder"].plugins), True, plan.kv_cache, files)
    (pkg / "engines" / RECORD_NAME).write_text(rec.to_json())
    return pkg, m


def open_fake(pkg, m, monkeypatch, cudart: FakeCudart, **kw) -> TrtBackend:
    """The TensorRT backend over the fake tensorrt/cuda-python (patched where the backend finds them)."""
    version = json.loads((pkg / "engines" / RECORD_NAME).read_text())["tensorrt_version"]
    monkeypatch.setattr(trt_env, "import_tensorrt", lambda: fake_trt(cudart, version))
    monkeypatch.setattr(trt_env, "import_cudart", lambda: cudart)
    return TrtBackend(pkg, m, **kw)


def generate(pkg, m, backend, batches):
    from tokenizers import Tokenizer

    from llava_edge.runtime.pipeline import Pipeline

    tok = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    pipe = Pipeline(pkg, m, backend, tok)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 41, 3), dtype=np.uint8))
    out = []
    for prompts in batches:
        images = [img if i == 0 else None for i in range(len(prompts))]
        out.append([r.token_ids for r in pipe.generate_batch(images, prompts, max_new_tokens=10)])
    return out


BATCHES = [["what is in the picture ?", "count the red circles please"], ["describe it"]]


BATCHES = [["what is in the picture ?", "count the red circles please"], ["describe it"]]
