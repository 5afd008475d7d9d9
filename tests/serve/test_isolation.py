"""Serving imports neither torch nor transformers, and `run` does not need the serve extra."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from .conftest import ROOT

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_server_imports_without_torch(served_package):
    code = BLOCK.format(blocked=("torch", "transformers")) + f"""
from llava_edge.serve.app import ServeConfig, create_app
from llava_edge.serve.server import parse_size
app = create_app(ServeConfig({str(served_package)!r}))
assert parse_size('10MB', 'x') == 10_000_000 and parse_size('40M', 'x') == 40_000_000
assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)
print('CLEAN')
"""
    proc = _run(code)
    assert proc.returncode == 0 and "CLEAN" in proc.stdout, proc.stderr


def test_cli_does_not_import_the_server_stack():
    code = BLOCK.format(blocked=("fastapi", "uvicorn", "prometheus_client", "starlette")) + """
import llava_edge.cli, llava_edge.runtime.pipeline, llava_edge.runtime.engine
print('CLEAN')
"""
    proc = _run(code)
    assert proc.returncode == 0 and "CLEAN" in proc.stdout, proc.stderr


def test_serve_sources_do_not_import_torch():
    import llava_edge.serve as serve

    for path in pathlib.Path(serve.__file__).parent.glob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            assert not s.startswith(("import torch", "from torch", "import transformers", "from transformers")), path


def test_serve_without_the_extra_is_a_one_line_error(tmp_path):
    code = BLOCK.format(blocked=("fastapi",)) + f"""
from llava_edge.cli import app
sys.argv = ['llava-edge', 'serve', {str(tmp_path)!r}]
app()
"""
    proc = _run(code)
    assert proc.returncode == 2 and "pip install 'llava-edge[serve]'" in proc.stderr, proc.stderr
