"""The TensorRT backend's own logic on CPU, against a fake ``tensorrt`` + ``cuda-python``.

The fakes run the package's ONNX graphs with onnxruntime on host memory, behind the TensorRT calls the
backend makes (profiles, set_input_shape, set_tensor_address, execute_async_v3, cudaMemcpy*), and
enforce what TensorRT would: input shapes inside the active profile, copies in the right direction,
outputs not larger than their buffers. This tests OUR buffer handling (profile switching, ping-pong KV
slabs, pinned staging, last-position logits via cudaMemcpy2D), not TensorRT.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import llava_edge.runtime.trt_backend as tb
from llava_edge.export.trt_build import plan_build
from llava_edge.package import load_manifest

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class FakeCudart:
    class cudaMemcpyKind:  # noqa: N801 - cuda-python's names
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self) -> None:
        self.device: dict[int, ctypes.Array] = {}
        self.pinned: dict[int, ctypes.Array] = {}
        self.mallocs = 0

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
        self.device[ctypes.addressof(b)] = b
        return 0, ctypes.addressof(b)

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
        h2d = kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice
        assert self._region(self.pinned if h2d else self.device, src, n), "copy source not in the right memory"
        assert self._region(self.device if h2d else self.pinned, dst, n), "copy destination not in the right memory"
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        for r in range(height):
            self.cudaMemcpyAsync(dst + r * dpitch, src + r * spitch, width, kind, stream)
        return (0,)


class FakeContext:
    def __init__(self, eng: "FakeEngine") -> None:
        self.eng, self.profile, self.shapes, self.addr = eng, 0, {}, {}
        self.runs: list[tuple[int, tuple]] = []

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
        if name.startswith("present."):
            b, t, _ = self.shapes["inputs_embeds"]
            return (b, d["kvh"], self.shapes["past_key_values.0.key"][2] + t, d["hd"])
        if name == "image_features":
            return (self.shapes["pixel_values"][0], d["n_img"], d["hidden"])
        return (*self.shapes["input_ids"], d["hidden"])

    def set_tensor_address(self, name, addr):
        self.addr[name] = addr
        return True

    def execute_async_v3(self, stream):
        feeds = {}
        for n in self.eng.inputs:
            dt, shape = np.dtype(self.eng.dtypes[n]), self.shapes[n]
            nbytes = int(np.prod(shape)) * dt.itemsize
            feeds[n] = np.frombuffer(ctypes.string_at(self.addr[n], nbytes), dt).reshape(shape) if nbytes else np.zeros(shape, dt)
        outs = self.eng.session.run(None, feeds)
        for n, o in zip(self.eng.outputs, outs):
            assert o.shape == tuple(self.get_tensor_shape(n)), n
            o = np.ascontiguousarray(o)
            ctypes.memmove(self.addr[n], o.ctypes.data, o.nbytes)
        self.runs.append((self.profile, self.shapes["inputs_embeds"] if "inputs_embeds" in self.shapes else ()))
        return True


class FakeEngine:
    def __init__(self, spec: dict) -> None:
        self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.dtypes = {i.name: _NP[i.type] for i in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self.profiles = [{k: tuple(tuple(s) for s in v) for k, v in p["shapes"].items()} for p in spec["profiles"]]
        self.dims = spec["dims"]
        self.num_io_tensors = len(self.inputs) + len(self.outputs)
        self.num_optimization_profiles = len(self.profiles)
        self.contexts: list[FakeContext] = []

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


def _fake_trt():
    m = types.ModuleType("fake_tensorrt")
    m.__version__ = "10.3.0.30"
    m.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    m.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    m.nptype = lambda dt: dt
    m.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                     "deserialize_cuda_engine": lambda self, buf: FakeEngine(json.loads(bytes(buf)))})
    return m


@pytest.fixture
def fake_backend(trt_package, tmp_path, monkeypatch):
    """A package copy with fake 'plans' (JSON naming the ONNX graph and plan_build's profiles)."""
    pkg = tmp_path / "pkg"
    shutil.copytree(trt_package, pkg)
    m = load_manifest(pkg)
    plan = plan_build(pkg, "10.3.0.30", "orin-agx", max_batch=2, max_context=96)
    (pkg / "engines").mkdir()
    t = m.text
    dims = {"vocab": t.vocab_size, "kvh": t.num_kv_heads, "hd": t.head_dim, "hidden": t.hidden_size,
            "n_img": m.vision.num_image_tokens}
    files = {}
    for name in ("vision", "embed", "decoder"):
        spec = {"onnx": str(pkg / m.graphs[name].file), "profiles": [p.as_dict() for p in plan.profiles[name]], "dims": dims}
        data = json.dumps(spec).encode()
        (pkg / "engines" / f"{name}.plan").write_bytes(data)
        files[name] = tb.EngineFile(f"engines/{name}.plan", m.graphs[name].file, m.graphs[name].size_bytes, len(data),
                                    m.dtype, spec["profiles"])
    rec = tb.EngineRecord(tb.RECORD_FORMAT, "10.3.0.30", "FakeGPU", "8.7", "orin-agx", {}, "standard", [], True,
                          "ping-pong", files)
    (pkg / "engines" / tb.RECORD_NAME).write_text(rec.to_json())
    cudart = FakeCudart()
    monkeypatch.setattr(tb, "import_tensorrt", _fake_trt)
    monkeypatch.setattr(tb, "import_cudart", lambda: cudart)
    backend = tb.TrtBackend(pkg, m)
    yield pkg, m, backend, cudart
    backend.close()


def test_pipeline_tokens_match_onnxruntime(fake_backend):
    from tokenizers import Tokenizer

    from llava_edge.runtime.ort_backend import OrtBackend
    from llava_edge.runtime.pipeline import Pipeline

    pkg, m, backend, cudart = fake_backend
    assert (backend.max_batch, backend.max_context) == (2, 96)
    mallocs = cudart.mallocs
    tok = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    ref = Pipeline(pkg, m, OrtBackend(pkg, m, threads=2), tok)
    trt = Pipeline(pkg, m, backend, tok)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 41, 3), dtype=np.uint8))
    a = ref.generate_batch([img, None], ["what is in the picture ?", "count the red circles please"], max_new_tokens=10)
    b = trt.generate_batch([img, None], ["what is in the picture ?", "count the red circles please"], max_new_tokens=10)
    assert [r.token_ids for r in b] == [r.token_ids for r in a]
    assert cudart.mallocs == mallocs  # nothing allocated per request or per token
    runs = backend.engines["decoder"].context.runs
    assert runs[0][0] == 0 and runs[0][1][1] > 1  # prefill profile first
    assert all(p == 1 and s[1] == 1 for p, s in runs[1:])  # then decode, one token each


def test_step_logits_and_continued_prefill(fake_backend):
    from llava_edge.runtime.ort_backend import OrtBackend

    pkg, m, be, _ = fake_backend
    oe = OrtBackend(pkg, m, threads=2)
    ids = np.array([[1, 5, 9, 7], [1, 8, 8, 2]], dtype=np.int64)
    emb = be.embed(ids)
    np.testing.assert_array_equal(emb, oe.embed(ids))
    mask, pos = np.ones((2, 4), np.int64), np.tile(np.arange(4), (2, 1))
    cache, oc = be.new_cache(2, 20), oe.new_cache(2, 20)
    np.testing.assert_allclose(be.step(cache, emb, mask, pos), oe.step(oc, emb, mask, pos), atol=1e-6)
    more = oe.embed(np.array([[3, 4, 6], [5, 6, 7]], np.int64))  # 3 tokens on a non-empty cache
    mask2, pos2 = np.ones((2, 7), np.int64), np.tile(np.arange(4, 7), (2, 1))
    np.testing.assert_allclose(be.step(cache, more, mask2, pos2), oe.step(oc, more, mask2, pos2), atol=1e-5)
    assert cache.length == 7
    one = oe.embed(np.array([[9], [9]], np.int64))
    mask3, pos3 = np.ones((2, 8), np.int64), np.full((2, 1), 7)
    np.testing.assert_allclose(be.step(cache, one, mask3, pos3), oe.step(oc, one, mask3, pos3), atol=1e-5)


def test_backend_limits_and_stale_cache(fake_backend):
    _, _, be, _ = fake_backend
    with pytest.raises(tb.BackendError, match="max batch 2"):
        be.new_cache(3, 10)
    with pytest.raises(tb.BackendError, match="max context 96"):
        be.new_cache(1, 97)
    old = be.new_cache(1, 10)
    be.new_cache(1, 10)
    e = np.zeros((1, 1, be.manifest.text.hidden_size), np.float32)
    with pytest.raises(tb.BackendError, match="superseded"):
        be.step(old, e, np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64))
    c = be.new_cache(1, 2)
    be.step(c, e, np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64))
    be.step(c, e, np.ones((1, 2), np.int64), np.ones((1, 1), np.int64))
    with pytest.raises(tb.BackendError, match="KV cache full"):
        be.step(c, e, np.ones((1, 3), np.int64), np.full((1, 1), 2))


def test_close_frees_everything(fake_backend):
    _, _, be, cudart = fake_backend
    assert cudart.device and cudart.pinned
    be.close()
    assert not cudart.device and not cudart.pinned
