"""The runtime must run where torch and transformers are not installed."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_run_without_torch_or_transformers(tiny_models, tmp_path):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (20, 30), (200, 10, 10)).save(img)
    code = BLOCKER + f"""
from llava_edge.cli import app
import llava_edge.runtime.pipeline, llava_edge.runtime.ort_backend, llava_edge.package
sys.argv = ['llava-edge', 'run', {str(tiny_models['llava-hf-gqa']['package'])!r}, '--image', {str(img)!r},
            '--prompt', 'hi', '--max-new-tokens', '3', '--json']
try:
    app()
except SystemExit as e:
    assert e.code in (0, None), e.code
assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)
print('CLEAN')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CLEAN" in proc.stdout and '"token_ids"' in proc.stdout


def test_runtime_sources_do_not_import_torch():
    import pathlib

    import llava_edge.runtime as rt

    for path in pathlib.Path(rt.__file__).parent.glob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            assert not s.startswith(("import torch", "from torch", "import transformers", "from transformers")), path
