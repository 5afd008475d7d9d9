"""`llava-edge serve --ray` without a cluster: the missing-extra error (a subprocess with Ray blocked), flag
errors and the config YAML (in process: nothing here starts a cluster)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT
from .test_isolation import BLOCK


def _cli(*args: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    code = (BLOCK.format(blocked=block) if block else "import sys\n") + f"""
from llava_edge.cli import app
sys.argv = ['llava-edge', 'serve', *{list(args)!r}]
app()
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED": "0"})


def test_ray_without_the_extra_is_a_one_line_error(served_package):
    proc = _cli(str(served_package), "--ray", block=("ray",))
    assert proc.returncode == 2 and "pip install 'llava-edge[ray]'" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--replicas", "2"], "need --ray"),
    (["--ray", "--replicas", "2", "--autoscale", "1,2"], "not both"),
    (["--ray", "--autoscale", "3"], "MIN,MAX"),
    (["--ray", "--autoscale", "2,1"], "MIN <= MAX"),
    (["--ray", "--ray-address", "http://x:1"], "ray://HOST:10001"),
])
def test_ray_flag_errors(served_package, args, message):
    pytest.importorskip("ray", reason="needs the ray extra")
    from typer.testing import CliRunner

    from llava_edge.cli import app

    r = CliRunner().invoke(app, ["serve", str(served_package), *args])  # each is refused before any cluster starts
    assert r.exit_code == 2 and message in r.output, r.output


def test_write_config_is_a_valid_serve_deploy_file_that_builds_the_same_app(served_package, tmp_path):
    pytest.importorskip("ray", reason="needs the ray extra")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from llava_edge.serve.ray_app import parse_args

    from typer.testing import CliRunner

    from llava_edge.cli import app

    out = tmp_path / "serve.yaml"
    r = CliRunner().invoke(app, ["serve", str(served_package), "--ray", "--autoscale", "1,3", "--gpus-per-replica",
                                 "0.5", "--max-slots", "6", "--api-key", "secret-key", "--host", "0.0.0.0", "--port",
                                 "9000", "--write-config", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "secret-key" not in text  # the key stays out of files
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 9000
    (application,) = schema.applications
    assert application.import_path == "llava_edge.serve.ray_app:app" and application.route_prefix == "/"
    configs, options = parse_args(application.args)
    opts = options.deployment_options(configs[0])
    assert configs[0].package == served_package.resolve() and configs[0].max_slots == 6
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
                                          "target_ongoing_requests": 6}
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5} and opts["max_ongoing_requests"] == 12
    assert "num_replicas" not in opts and opts["max_queued_requests"] == 64 * 3


def test_ray_app_imports_neither_torch_nor_transformers():
    pytest.importorskip("ray", reason="needs the ray extra")
    code = BLOCK.format(blocked=("torch", "transformers")) + """
import llava_edge.serve.ray_app
print('CLEAN')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "CLEAN" in proc.stdout, proc.stderr
