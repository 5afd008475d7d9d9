"""llava-edge command line. Each command is a thin wrapper over the Python API.

Commands that only run a package (run, chat, inspect) import no torch; export/quantize/demo import
it lazily. Errors a user can cause print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import inspect as _inspect
import json
import logging
import math
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from .contract import KV_INPLACE
from .errors import LlavaEdgeError, Terminated, UsageError
from .io_safe import WRITE_ERRNOS, check_regular_file, display, write_error
from .options import Setting
from .package import sigterm_as_interrupt
from .quantize.options import quantize_settings
from .runtime.preprocess import MAX_IMAGE_PIXELS
from .runtime.prune import PRUNE_HELP
from .runtime.sizes import format_size, parse_size
from .serve.settings import API_KEY_ENV, BACKEND_HELP, ray_settings, serve_settings

console = Console(stderr=True)
out = Console()
# click's exception classes, wherever this typer keeps them (its own vendored copy since 0.22, click before)
_click_errors = sys.modules[typer.BadParameter.__module__]
# One name, type and meaning per flag across verbs (tests/test_cli.py checks it). "Tokens to generate" is
# --max-new-tokens everywhere; serve's --max-tokens is another thing (the server's cap on the API's max_tokens).
# An old name stays as a second name of its option, listed after the canonical one.
MAX_NEW_TOKENS = "--max-new-tokens"
IMAGE_PIXELS_HELP = ("Refuse images with more pixels (width x height), read from the header before decoding: 40M "
                     "or a plain count, as in serve.")


PRUNE = "--prune"  # run, chat, watch, eval, bench, bench-serve; serve's comes from ServeConfig.prune


def _prune_option() -> Any:
    return typer.Option("off", PRUNE, metavar="METHOD:RATIO", help=PRUNE_HELP)


def _prune(value: str):
    """The --prune value as a PruneSetting, or one error line naming the flag."""
    from .runtime.prune import PruneError, PruneSetting

    try:
        return PruneSetting.parse(value)
    except PruneError as e:
        raise UsageError(f"{PRUNE}: {e}") from None


_ARGS: list[str] = []  # this run's command line, for _typed


def _typed(*names: str) -> str:
    """Of an option's names (canonical first, then old ones), the one this command line used: an error
    names the flag the user typed."""
    used = [a.split("=", 1)[0] for a in _ARGS if a.split("=", 1)[0] in names]
    return used[-1] if used else names[0]


class _NoteHandler(logging.Handler):
    """The library's notices (a stale staging directory removed, ...) as `note:` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"[yellow]note:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


class _Group(TyperGroup):
    """The command group, run so that a usage error (a bad flag value, a missing option) is one `error:`
    line and exit code 2 like every other user error, not click's usage box; and so that SIGTERM
    unwinds like Ctrl-C (staging directories removed)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _ARGS[:] = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        logger = logging.getLogger("llava_edge")
        if not any(isinstance(h, _NoteHandler) for h in logger.handlers):
            logger.addHandler(_NoteHandler(logging.WARNING))  # notices; INFO (the server's log) is not one
        stdout = sys.stdout
        sys.stdout = _StdoutGuard(stdout)  # a failed write to it says so (stdout or a file? see friendly)
        try:
            with sigterm_as_interrupt():
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            _flush_stdout()
        except OSError as e:
            if not getattr(e, "llava_edge_stdout", False):
                raise
            _stdout_failed(e, stdout)
        except getattr(_click_errors, "NoArgsIsHelpError", ()) as e:
            e.show()
            sys.exit(2)
        except _click_errors.ClickException as e:
            where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
            console.print(f"[red]error:[/] {escape(display(e.format_message()))}{where}", highlight=False,
                          soft_wrap=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            console.print("[yellow]interrupted[/]")
            sys.exit(130)
        finally:
            if isinstance(sys.stdout, _StdoutGuard):
                sys.stdout = stdout
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    help="Export, quantize, compile and run LLaVA on edge devices and plain CPUs.\n\n"
    "Typical flow: export CHECKPOINT -o PKG, then run PKG --image x.jpg --prompt '...'.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_Group,
)


def friendly(fn: Callable) -> Callable:
    """One-line error and exit code 2 for bad input; Ctrl-C exits 130 quietly."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            _flush_stdout()  # output still buffered fails here, classified below, not at interpreter exit
            return result
        except Terminated:
            console.print("[yellow]terminated[/]")
            raise typer.Exit(143)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130)
        except typer.Exit:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if isinstance(e, (LlavaEdgeError, FileNotFoundError)):
                _error_line(str(e))
                raise typer.Exit(2)
            if isinstance(e, OSError) and getattr(e, "llava_edge_stdout", False):
                _stdout_failed(e, sys.stdout)
            if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:  # a full or read-only disk: not a bug
                _error_line(f"cannot write{' ' + display(e.filename) if e.filename else ''}: {e.strerror or e}")
                raise typer.Exit(2)
            raise

    return wrapper


def _error_line(message: str) -> None:
    console.print(f"[red]error:[/] {escape(display(message))}", highlight=False, soft_wrap=True)


def _flush_stdout() -> None:
    if sys.stdout is not None:
        sys.stdout.flush()


class _StdoutGuard:
    """sys.stdout while a command runs: the same stream, but an OSError from writing to it is marked
    (`llava_edge_stdout`), so `run > file` on a full disk is told from a full disk under an output file."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            e.llava_edge_stdout = True
            raise

    def flush(self):
        if self._stream is None:
            return None
        try:
            return self._stream.flush()
        except OSError as e:
            e.llava_edge_stdout = True
            raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _stdout_failed(e: OSError, stream) -> None:
    """Standard output failed: a closed pipe (`| head`) exits quietly with 1, as rich and click do;
    anything else (a full disk behind `> file`) is one error line and exit 2. Either way stdout is
    pointed at /dev/null first, so the interpreter's last flush has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a test runner's capture)
        pass
    if e.errno == errno.EPIPE:
        sys.exit(1)
    _error_line(f"cannot write to standard output: {e.strerror or e}")
    sys.exit(2)


# a library error that carries a full or read-only disk in its text, not as an OSError (safetensors,
# torch's C++ writers): "No space left on device (os error 28)"
_WRITE_FAILURES = re.compile("|".join(re.escape(os.strerror(n)) for n in sorted(WRITE_ERRNOS)))


@contextlib.contextmanager
def _writing(target: Path):
    """Around a command's writing of `target` (a package or checkpoint directory, staged; an output
    file): a full disk, a read-only mount or an I/O error is `cannot write TARGET: <reason>`. The staging
    directory is already gone by then (staged_package removes it on any exception)."""
    try:
        yield
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise write_error(target, e) from None
        raise
    except LlavaEdgeError:
        raise
    except UnicodeEncodeError as e:  # a name or text a library could not encode (surrogates)
        raise write_error(target, e) from None
    except Exception as e:  # noqa: BLE001 - re-raised unless it reports a write failure in its text
        found = _WRITE_FAILURES.search(str(e))
        if found is None:
            raise
        raise write_error(target, OSError(None, found.group(0))) from None


_INT_MAX = 2**31 - 1  # a count past this is a typo, and past int32 for the graphs' inputs


def _in_range(value, flag: str, lo=None, hi=None, *, lo_open: bool = False) -> None:
    """A numeric flag within [lo, hi] (or (lo, hi] with lo_open); nan and inf are refused. None passes."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, not {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise UsageError(f"{flag} must be {'>' if lo_open else '>='} {lo}, not {value}")
    if hi is not None and value > hi:
        raise UsageError(f"{flag} must be at most {hi}, not {value}")


def _utf8_path(path: Path, what: str) -> None:
    """A directory the model libraries write into (tokenizers, safetensors, onnx take str paths and
    encode them as UTF-8): a name with undecodable bytes is refused now, by name, not as their traceback."""
    try:
        raw = os.fsencode(path.absolute())
        raw.decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError) as e:
        byte = f" (byte {raw[e.start]:#04x})" if isinstance(e, UnicodeDecodeError) else ""
        raise UsageError(f"{what} {display(path)}: the path is not valid UTF-8{byte}; the model libraries "
                         "cannot write there: choose a UTF-8 name") from None


def _check_output_file(path: Path | None) -> None:
    """An output file flag, checked before any work; an existing special file (/dev/null) is taken."""
    from .package import check_output_file

    if path is not None and not (path.exists() and not path.is_file() and not path.is_dir()):
        check_output_file(path)


def _positive(value: int | None, flag: str) -> None:
    _in_range(value, flag, 1, 4096 if flag == "--threads" else _INT_MAX)


def _sampling(greedy: bool, temperature: float | None, top_p: float, top_k: int, repetition_penalty: float,
              seed: int | None):
    from .runtime.sampling import SamplingConfig

    if greedy and temperature not in (None, 0.0):
        raise UsageError("--greedy and --temperature exclude each other")
    return SamplingConfig(temperature=0.0 if greedy or temperature is None else temperature, top_p=top_p,
                          top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)


_MAX_OPSET = 20  # the TorchScript exporter's newest (export runs it: dynamo=False)


def _load_schema(path: Path | None) -> dict | None:
    """--json-schema FILE: a regular file of at most 1 MB (/dev/zero or a FIFO is refused by name, not read)."""
    if path is None:
        return None
    from .io_safe import check_size
    from .runtime.constrain import load_schema

    check_size(path, "--json-schema")
    return load_schema(path)


def _size(flag: str) -> Callable[[Any], int]:
    """The parser of a size option (10MB, 40M, 512KiB or a plain count), the same in every verb; a bad value
    is click's one `Invalid value for '--flag'` line, like any other unreadable number."""

    def size(text: Any) -> int:
        try:
            return parse_size(text, flag)
        except UsageError:
            raise typer.BadParameter(f"cannot read {text!r} as a size (e.g. 10MB, 40M, 2000000)") from None

    return size


def _size_option(default: int, flag: str, help: str, unit: str = "", **kw: Any) -> Any:
    return typer.Option(format_size(default, unit), flag, parser=_size(flag), metavar="SIZE", help=help, **kw)


def _setting_option(s: Setting) -> tuple[Any, Any]:
    """An option field (llava_edge/options.py: ServeConfig's, QuantizeOptions', ...) as a typer option:
    (annotation, typer.Option)."""
    kw = {"help": s.help, "envvar": s.envvar}
    if s.kind == "bool":
        return bool, typer.Option(s.default, f"{s.flag}/--no-{s.flag[2:]}", **kw)
    if s.kind == "size":
        return int, _size_option(s.default, s.flag, unit=s.unit, **kw)
    if s.kind == "list":
        return list[str], typer.Option(list(s.default), s.flag, **kw)
    if s.kind == "autoscale":  # MIN,MAX, parsed by RayOptions
        return Optional[str], typer.Option(s.default, s.flag, **kw)
    if s.kind == "enum":  # typer offers the values ([gptq|rtn]) and parses them into the enum
        return (Optional[s.choices] if s.optional else s.choices), typer.Option(s.default, s.flag, **kw)
    base = {"str": str, "int": int, "float": float, "path": Path}[s.kind]
    return (Optional[base] if s.optional else base), typer.Option(s.default, s.flag, **kw)


def _with_settings(settings: tuple[Setting, ...], after: str, into: str = "settings"):
    """Give a command one option per setting, declared where the settings are (no flag written twice): they
    come after its parameter `after` in --help, and reach the command as one dict, `settings` (lists as
    tuples). typer reads the signature, so the wrapper's is the command's with `settings` replaced by them."""

    def decorate(fn: Callable) -> Callable:
        import typing

        hints = typing.get_type_hints(fn)
        own = [p.replace(kind=_inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
               for p in _inspect.signature(fn).parameters.values() if p.name != into]
        added = []
        for s in settings:
            annotation, default = _setting_option(s)
            added.append(_inspect.Parameter(s.name, _inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
        cut = [p.name for p in own].index(after) + 1

        @functools.wraps(fn)
        def wrapper(**kwargs):
            values = {s.name: kwargs.pop(s.name) for s in settings}
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return fn(**{into: values}, **kwargs)

        params = own[:cut] + added + own[cut:]
        wrapper.__signature__ = _inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


SERVE_SETTINGS = serve_settings()
# the CLI passes only the Ray options given (None: RayOptions' own default), so a flag without --ray is seen
RAY_SETTINGS = tuple(dataclasses.replace(s, default=None, optional=True, help=s.help if "default" in s.help or
                                         s.default is None else f"{s.help[:-1]} (default {s.default:g}).")
                     for s in ray_settings())


@app.command()
@friendly
def export(
    checkpoint: Path = typer.Argument(..., help="LLaVA checkpoint directory (llava-hf or original LLaVA layout)."),
    output: Path = typer.Option(..., "-o", "--output", help="Model package directory to create."),
    dtype: str = typer.Option("fp32", help="Graph precision: fp32 or fp16."),
    opset: int = typer.Option(17, help="ONNX opset (>= 17)."),
    vision_tower: Optional[Path] = typer.Option(None, help="Local CLIP directory for original checkpoints whose "
                                                "mm_vision_tower is a hub name."),
    template: Optional[str] = typer.Option(None, help="Override the chat template (llava_hf, llava_hf_space, "
                                           "llava_v1, mistral_inst, chatml, phi3, plain)."),
    overwrite: bool = typer.Option(False, help="Replace an existing package directory."),
    fast: bool = typer.Option(False, "--fast", help="Also add the fast decoder (GroupQueryAttention, in-place KV "
                              "cache; CPU) for --backend ort-fast."),
    fast_int4: bool = typer.Option(False, "--fast-int4", help="Also add an int4 (round-to-nearest) fast decoder "
                                   "for --backend ort-fast-int4."),
    target: str = typer.Option("portable", help="Which decoder the package holds: portable (every backend, "
                               "quantize and build; --fast/--fast-int4 add fast ones), cpu (only the fast fp32 "
                               "decoder, ort-fast) or cpu-int4 (only the int4 fast decoder, ort-fast-int4)."),
    embed: str = typer.Option("auto", help="Embedding table: float, int8 (a quarter of the bytes, rows within "
                              "1% of float) or auto (int8 for --target cpu-int4, float otherwise)."),
    lm_head: str = typer.Option("auto", help="lm_head of the fast decoders: float, int8 (8-bit MatMulNBits: "
                                "a quarter of the bytes read per token) or auto (int8 in int4 decoders, float "
                                "otherwise)."),
    int4_block: int = typer.Option(128, help="Block of the int4 decoder's weights along K (one scale each): 32, "
                                   "64, 128 or 256. Bigger blocks are coarser and run faster on a CPU (docs/cpu.md: on "
                                   "a 1B model 256 decoded ~18% and prefilled ~12% faster than 128); its accuracy "
                                   "cost is not measured here: check it on your data."),
    check_layers: Optional[int] = typer.Option(None, help="cpu targets: decoder layers the export check runs in "
                                               "torch (default: all when the fp32 model fits in memory, else 2); "
                                               "the decoder itself is never loaded whole."),
    vision: str = typer.Option("auto", help="Vision tower: fp32, int8 (int8 MatMuls, dynamic activation scale; "
                               "~2.3x faster image encoding, a quarter of the bytes), int8-blocked (MatMulNBits "
                               "8-bit, activation scale per block of 128) or auto (int8 for --target cpu-int4, fp32 "
                               "otherwise). int8 is checked against the fp32 tower."),
) -> None:
    """Split a checkpoint into vision / embed / decoder ONNX graphs, verified against PyTorch."""
    from .package import check_output_dir
    from .progress import Stages

    if target not in ("portable", "cpu", "cpu-int4"):
        raise UsageError(f"--target {target!r}: use portable, cpu or cpu-int4")
    # --embed, --lm-head, --vision, --int4-block and --check-layers are checked by export_package, before any
    # work; here only what depends on --fast/--fast-int4, which export_package does not see
    if target == "portable" and lm_head == "int8" and not (fast or fast_int4):
        raise UsageError("--lm-head int8 applies to fast decoders: add --fast/--fast-int4 or use --target cpu/cpu-int4")
    if target != "portable" and (fast or fast_int4):
        raise UsageError(f"--target {target} holds one decoder; --fast and --fast-int4 add to a portable package "
                         "(--target portable)")
    _in_range(opset, "--opset", 17, _MAX_OPSET)
    _positive(check_layers, "--check-layers")
    _utf8_path(output, "--output")
    check_output_dir(output, overwrite, protect=[p for p in (checkpoint, vision_tower) if p is not None])
    from .export.exporter import export_package

    # every graph (--fast/--fast-int4 too) from one load, staged and verified before the package appears
    with _writing(output), Stages(console).running() as on_stage:
        result = export_package(checkpoint, output, dtype=dtype, opset=opset, overwrite=overwrite,
                                vision_tower=vision_tower, chat_template=template, on_stage=on_stage, target=target,
                                embed=embed, lm_head=lm_head, check_layers=check_layers, vision_quant=vision,
                                int4_block=int4_block, fast=fast, fast_int4=fast_int4)
    errs = ", ".join(f"{k} {v:.2e}" for k, v in result.errors.items())
    console.print(f"[green]exported[/] {escape(display(output))} ({result.manifest.dtype}, target {target}); "
                  f"checks: {errs}", highlight=False)


QUANTIZE_SETTINGS = quantize_settings()


@app.command()
@friendly
@_with_settings(QUANTIZE_SETTINGS, after="checkpoint", into="options")
def quantize(
    package: Path = typer.Argument(..., help="fp32/fp16 model package (from export)."),
    checkpoint: Optional[Path] = typer.Option(None, help="The checkpoint the package came from (needed for "
                                              "calibration unless --from-gptq)."),
    options: dict = None,  # every QuantizeOptions field (quantize/options.py): --calib ... --torch-threads
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="New package directory "
                                          "(default PKG-METHOD-intBITS-gGROUP)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output package directory."),
) -> None:
    """GPTQ (or RTN) the decoder to 4 bits, calibrated on image+text conversations; writes a new package."""
    from .package import check_output_dir, load_manifest
    from .progress import Stages
    from .quantize.options import QuantizeOptions

    opts = QuantizeOptions(**options)  # every flag checked, before any work
    if output is not None:
        _utf8_path(output, "--output")
    load_manifest(package)  # a bad package is refused before torch is imported
    if output is not None:
        check_output_dir(output, overwrite, protect=[p for p in (package, checkpoint, opts.from_gptq) if p is not None])
    from .quantize.quantize import quantize_package

    target = output if output is not None else opts.default_output(package)
    with _writing(target), Stages(console).running() as on_stage:
        result = quantize_package(package, checkpoint, output, opts, overwrite=overwrite, on_stage=on_stage)
    console.print(f"[green]quantized[/] -> {escape(display(result.package_dir))}", highlight=False)


@app.command()
@friendly
def build(
    package: Path = typer.Argument(..., help="Model package (fp16, or int4 quantized with --format qdq)."),
    target: str = typer.Option("auto", help="auto, orin-agx, orin-nx, orin-nano or datacenter: sets memory "
                               "budget and default limits."),
    max_batch: Optional[int] = typer.Option(None, help="Largest batch the engines accept."),
    max_context: Optional[int] = typer.Option(None, help="Longest prompt + answer, in tokens."),
    max_images: Optional[int] = typer.Option(None, help="Images per prompt."),
    workspace_gb: Optional[float] = typer.Option(None, help="TensorRT builder workspace."),
    timing_cache: Optional[Path] = typer.Option(None, help="Reuse/refresh this timing cache file."),
    plugins: str = typer.Option("auto", help="auto|on|off: on = decoder with our Triton attention plugin (TensorRT "
                                ">= 10.9); auto = the plugin decoder on TensorRT >= 10.9 when the model allows it, "
                                "standard ops otherwise (10.3); off = standard ops."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan only (profiles, memory, op support); "
                                 "needs no TensorRT."),
    trt_version: Optional[str] = typer.Option(None, help="With --dry-run: plan for this TensorRT version."),
    kv_cache: str = typer.Option(KV_INPLACE, help="in-place (static-cache decoder: one KV buffer, CUDA graphs) or "
                                 "ping-pong (the portable decoder: two KV buffers)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan/result as JSON."),
) -> None:
    """Compile TensorRT engines into PKG/engines, sized for the target device."""
    for value, flag in ((max_batch, "--max-batch"), (max_context, "--max-context"), (max_images, "--max-images")):
        _positive(value, flag)
    if workspace_gb is not None and not 0 < workspace_gb < float("inf"):
        raise UsageError(f"--workspace-gb must be a positive number, not {workspace_gb}")
    from .trt.builder import build_engines, result_summary

    result = build_engines(package, target=target, max_batch=max_batch, max_context=max_context,
                           max_images=max_images, workspace_gb=workspace_gb, timing_cache=timing_cache,
                           plugins=plugins, on_stage=lambda s: console.print(f"[dim]{s}[/]"), dry_run=dry_run,
                           trt_version=trt_version, kv_cache=kv_cache)
    summary = result_summary(result)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            out.print(f"{k}: {v}", highlight=False, markup=False)


@app.command()
@friendly
def run(
    package: Path = typer.Argument(..., help="Model package directory (from export/quantize)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The question or instruction."),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="Image file (jpg, png, ...)."),
    max_new_tokens: int = typer.Option(64, MAX_NEW_TOKENS, help="Generate at most this many tokens."),
    greedy: bool = typer.Option(False, "--greedy", help="Deterministic argmax decoding (the default without "
                                "--temperature)."),
    temperature: Optional[float] = typer.Option(None, help="Sample with this temperature (> 0)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = all)."),
    repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeats."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    stop: list[str] = typer.Option([], help="Stop when this text is generated (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, token_ids, timings)."),
    threads: Optional[int] = typer.Option(None, help="onnxruntime intra-op threads."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (ort: both, with onnxruntime-gpu for cuda; ort-fast*: "
                                         "cpu; tensorrt: cuda); default: the backend's first."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    template: Optional[str] = typer.Option(None, help="Override the package's chat template."),
    max_image_pixels: int = _size_option(MAX_IMAGE_PIXELS, "--max-image-pixels", IMAGE_PIXELS_HELP),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="Answer with JSON that validates "
                                               "against this JSON-schema file (constrained decoding)."),
    prune: str = _prune_option(),
) -> None:
    """Answer one prompt about one image, streaming the answer."""
    from .runtime.inputs import check_stop, check_text
    from .runtime.pipeline import Pipeline, Request, drain
    from .runtime.preprocess import load_image

    prompt = check_text(prompt, "--prompt")
    stop = check_stop(stop)
    _positive(max_new_tokens, "--max-new-tokens")
    _positive(threads, "--threads")
    _positive(max_image_pixels, "--max-image-pixels")
    sampling = _sampling(greedy, temperature, top_p, top_k, repetition_penalty, seed)
    schema = _load_schema(json_schema)
    pruning = _prune(prune)
    if image is not None:
        check_regular_file(image, "--image")
    picture = load_image(image, max_image_pixels) if image is not None else None  # a bad image fails in ms
    pipe = Pipeline.from_package(package, backend=backend, device=device, threads=threads, template=template,
                                 max_image_pixels=max_image_pixels, prune=pruning)
    req = Request([(prompt, None)], [picture] if picture is not None else [])
    stream = None if as_json else (lambda e: out.print(e.text, end="", highlight=False, soft_wrap=True, markup=False))
    result = drain(pipe.run_engine([req], max_new_tokens, sampling, stop, json_schema=schema), stream)[0]
    if as_json:
        print(json.dumps(result.as_dict()))
    else:
        out.print()
        t = result.timings
        console.print(f"[dim]{len(result.token_ids)} tokens, vision {t.vision_ms:.1f} ms, prefill "
                      f"{t.prefill_ms:.1f} ms, {t.tokens_per_s:.1f} tok/s ({result.finish_reason})[/]")


@app.command()
@friendly
def chat(
    package: Path = typer.Argument(..., help="Model package directory."),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="Image the conversation is about."),
    max_new_tokens: int = typer.Option(128, MAX_NEW_TOKENS, help="Generate at most this many tokens per answer."),
    temperature: Optional[float] = typer.Option(None, help="Sample with this temperature (default greedy)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    threads: Optional[int] = typer.Option(None, help="onnxruntime intra-op threads."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda; default: the backend's first."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    max_image_pixels: int = _size_option(MAX_IMAGE_PIXELS, "--max-image-pixels", IMAGE_PIXELS_HELP),
    prune: str = _prune_option(),
) -> None:
    """Multi-turn chat in the terminal. /image PATH switches image, /reset forgets, /quit (or Ctrl-D) exits.

    The oldest turns are dropped when the conversation outgrows the context; a bad line (an unreadable
    image, invalid UTF-8, an unknown /command) is answered with an error and the session goes on."""
    from .runtime.inputs import check_text
    from .runtime.pipeline import Pipeline, Request, drain
    from .runtime.preprocess import load_image

    _positive(max_new_tokens, "--max-new-tokens")
    _positive(threads, "--threads")
    sampling = _sampling(False, temperature, top_p, 0, 1.0, seed)
    _positive(max_image_pixels, "--max-image-pixels")
    pruning = _prune(prune)
    pipe = Pipeline.from_package(package, backend=backend, device=device, threads=threads,
                                 max_image_pixels=max_image_pixels, prune=pruning)
    if image:
        check_regular_file(image, "--image")
    current = load_image(image, max_image_pixels) if image else None
    history: list[tuple[str, str]] = []
    context = pipe.manifest.text.max_context
    told_dropping = False
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # invalid UTF-8 reaches check_text, not a crash
    commands = "/image PATH, /reset, /quit"
    console.print(f"[dim]{commands}[/]")

    def say_error(message: str) -> None:
        console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)

    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            out.print()
            return
        try:
            line = check_text(line, "the line", allow_empty=True)
        except UsageError as e:
            say_error(str(e))
            continue
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/reset":
                history.clear()
                console.print("[dim]conversation reset[/]")
            elif cmd == "/image":
                if not arg.strip():
                    say_error("usage: /image PATH")
                    continue
                try:
                    check_regular_file(arg.strip(), "image")
                    current = load_image(arg.strip(), pipe.max_image_pixels)
                except UsageError as e:
                    say_error(str(e))
                    continue
                history.clear()
                console.print(f"[dim]image {escape(display(arg.strip()))} ({current.width}x{current.height}); "
                              "conversation reset[/]", highlight=False)
            else:
                say_error(f"unknown command {cmd}; commands: {commands}")
            continue
        images = [current] if current is not None else []
        try:
            # keep the newest turns that fit: drop the oldest until prompt + answer fit the context
            while True:
                req = Request([*history, (line, None)], images)
                need = len(pipe.encode_request(req)) + max_new_tokens
                if need <= context or not history:
                    break
                history.pop(0)
                if not told_dropping:
                    console.print(f"[dim]note: dropping the oldest turns to stay within the model's context of "
                                  f"{context} tokens[/]")
                    told_dropping = True
            if need > context:
                say_error(f"this line needs {need} tokens (image and --max-new-tokens {max_new_tokens} included), "
                          f"more than the model's context of {context}; shorten it")
                continue
            out.print("llava> ", end="")
            result = drain(pipe.run([req], max_new_tokens=max_new_tokens, sampling=sampling),
                           lambda e: out.print(e.text, end="", highlight=False, soft_wrap=True, markup=False))[0]
        except UsageError as e:
            say_error(str(e))
            continue
        out.print()
        history.append((line, result.text))


@app.command()
@friendly
def inspect(package: Path = typer.Argument(..., help="Model package directory."),
            as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
            verify: bool = typer.Option(False, "--verify", help="Re-hash every file against the sha256 digests in "
                                        "the manifest (reads the whole package).")) -> None:
    """Show a package's graphs, shapes, dtypes, sizes, quantization and tool versions."""
    from .package import PackageError, load_manifest, verify_package

    if verify:
        m, bad = verify_package(package)
        if bad:
            raise PackageError(f"package {package}: {', '.join(bad)} differ(s) from the sha256 in the manifest; the "
                               "package is corrupt or was modified: copy or export it again")
        if not m.digests:
            console.print(f"[yellow]note:[/] {package} records no digests (written by an older llava-edge); only "
                          "presence and sizes were checked", highlight=False, soft_wrap=True)
        else:
            console.print(f"[green]verified[/] {len(m.digests)} files of {package} (sha256)", highlight=False,
                          soft_wrap=True)
    m = load_manifest(package)
    if as_json:
        print(m.to_json())
        return
    t, v = m.text, m.vision
    out.print(f"[bold]{package}[/]  format v{m.format_version}, {m.dtype}, from {m.source.get('layout')} "
              f"checkpoint {m.source.get('path')}")
    if m.family:
        out.print(f"family: {m.family.get('model', 'llava')}, decoder {m.family.get('decoder', '?')}, "
                  f"vision {m.family.get('vision', '?')}")
    decoders = ", ".join(g for g in m.graphs if g.startswith("decoder"))
    out.print(f"target: {m.extra.get('target', 'portable')} (decoders: {decoders or 'none'})")
    heads = {n: c.get("lm_head_bits") for n, c in m.extra.get("fast_decoders", {}).items()}
    out.print(f"weights: embed {m.extra.get('embed', 'float')}, fast decoders' lm_head "
              + (", ".join(f"{n} {'int' + str(b) if b else 'float'}" for n, b in heads.items()) or "-"))
    if m.extra.get("context_cap"):
        out.print(f"context capped at {t.max_context}: {m.extra['context_cap']}")
    out.print(f"decoder: {t.num_layers} layers, hidden {t.hidden_size}, heads {t.num_heads} (kv {t.num_kv_heads}) x "
              f"{t.head_dim}, vocab {t.vocab_size}, context {t.max_context}, template {t.chat_template}")
    out.print(f"vision: {v.image_size}px / patch {v.patch_size} -> {v.num_image_tokens} tokens per image, layer "
              f"{v.vision_feature_layer}, strategy {v.select_strategy}, pad-to-square {v.pad_to_square}")
    vq = m.extra.get("vision_quant")
    rel = vq.get("relative_error") if vq else None
    out.print(f"vision weights: {m.dtype}" if not vq else
              f"vision weights: {vq.get('option')} ({vq.get('method')}, {vq.get('quantized')} MatMuls; relative error "
              f"vs the fp32 tower {'-' if rel is None else f'{rel:.2e}'})")
    table = Table("graph", "file", "size", "inputs", "outputs", "max err")
    for name, g in m.graphs.items():
        fmt = lambda ts: "\n".join(f"{x.name} {x.dtype}{x.shape}" for x in ts)  # noqa: E731
        err = "-" if g.max_abs_error is None else f"{g.max_abs_error:.1e}"
        table.add_row(name, g.file, f"{g.size_bytes / 1e6:.2f} MB",
                      fmt(g.inputs[:3]) + ("\n..." if len(g.inputs) > 3 else ""),
                      fmt(g.outputs[:2]) + ("\n..." if len(g.outputs) > 2 else ""), err)
    out.print(table)
    out.print(f"quantization: {json.dumps(m.quantization) if m.quantization else 'none'}")
    out.print("versions: " + ", ".join(f"{k} {val}" for k, val in m.versions.items()))


@app.command()
@friendly
def bench(
    package: Path = typer.Argument(..., help="Model package to measure."),
    backend: str = typer.Option("auto", help="Comma list of backends: " + BACKEND_HELP),
    device: str = typer.Option("cpu", help="cpu or cuda (onnxruntime backends)."),
    batch: str = typer.Option("1", help="Comma list of batch sizes."),
    prompt_len: str = typer.Option("64", help="Comma list of text prompt lengths (image tokens come on top)."),
    max_new_tokens: int = typer.Option(128, MAX_NEW_TOKENS, "--new-tokens", help="Tokens generated per request "
                                       "(eos ignored, so exactly this many; --new-tokens: its old name)."),
    baseline: Optional[str] = typer.Option(None, help="'transformers' to run HF generate in the same run."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint for the transformers baseline."),
    repeat: int = typer.Option(3, help="Measured repeats (medians reported)."),
    warmup: int = typer.Option(1, help="Unmeasured warm-up runs."),
    threads: Optional[int] = typer.Option(None, help="Threads for onnxruntime and torch."),
    no_image: bool = typer.Option(False, "--no-image", help="Text-only prompts."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write results JSON here."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of latency breakdown and tokens/s."),
    md: Optional[Path] = typer.Option(None, help="Also write a markdown note with the command."),
    prune: str = _prune_option(),
) -> None:
    """Latency (vision, time to first token, per token), throughput and memory, vs transformers."""
    from .io_safe import atomic_output, write_atomic

    _positive(threads, "--threads")
    _positive(max_new_tokens, _typed(MAX_NEW_TOKENS, "--new-tokens"))
    for path in (output, plot, md):
        _check_output_file(path)
    try:
        batches, prompt_lens = [int(x) for x in batch.split(",")], [int(x) for x in prompt_len.split(",")]
    except ValueError:
        raise UsageError("--batch and --prompt-len take comma-separated integers, e.g. 1,4") from None
    for v in batches + prompt_lens:
        _positive(v, "--batch/--prompt-len")
    _positive(repeat, "--repeat")
    _in_range(warmup, "--warmup", 0, _INT_MAX)
    pruning = _prune(prune)
    from .benchmarks.harness import run_benchmark

    report = run_benchmark(package, backend=backend, batch=batches,
                           prompt_len=prompt_lens, new_tokens=max_new_tokens,
                           baseline=baseline, checkpoint=checkpoint, repeat=repeat, warmup=warmup, threads=threads,
                           device=device, with_image=not no_image, out_json=None, plot=None,
                           on_progress=lambda s: console.print(f"[dim]{escape(s)}[/]"), prune=str(pruning))
    if output:  # each file whole or not at all: a full disk leaves none half-written
        write_atomic(output, report.to_json())
    if plot:
        from .benchmarks.report import plot_report

        with atomic_output(plot) as tmp:
            plot_report(report, tmp)
    if md:
        from .benchmarks.report import markdown

        write_atomic(md, markdown(report, "llava-edge bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])))


@app.command("random-checkpoint")
@friendly
def random_checkpoint(
    arch: str = typer.Argument(..., help="llava-1.5-7b, edge-1b or small-100m."),
    output: Path = typer.Argument(..., help="Checkpoint directory to write (llava-hf layout, fp16)."),
) -> None:
    """Write a random-weight checkpoint of a named architecture, for speed work without weights."""
    from .package import check_output_dir, staged_package

    if output.is_dir() and any(output.iterdir()):
        raise UsageError(f"output directory {display(output)} exists and is not empty; random-checkpoint writes "
                         "only a new or empty directory")
    _utf8_path(output, "OUTPUT")
    check_output_dir(output)
    from .benchmarks.arch import build_random_checkpoint, get_arch

    spec = get_arch(arch)
    with _writing(output), staged_package(output) as tmp:
        build_random_checkpoint(spec, tmp)
    console.print(f"[green]wrote[/] {escape(display(output))}", highlight=False)


@app.command("eval")
@friendly
def evaluate_cmd(
    target: Path = typer.Argument(..., help="A model package (scored through the runtime) or a llava-hf "
                                  "checkpoint (scored with transformers)."),
    n: int = typer.Option(300, help="Held-out scenes (5-9 questions each)."),
    backend: str = typer.Option("auto", help="Runtime backend for packages: " + BACKEND_HELP),
    threads: Optional[int] = typer.Option(None, help="onnxruntime threads (a package) or torch threads (a "
                                          "checkpoint)."),
    max_new_tokens: int = typer.Option(8, MAX_NEW_TOKENS, help="Generate at most this many tokens per answer "
                                       "(the answers are a word or two)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write per-type results JSON here."),
    prune: str = _prune_option(),
) -> None:
    """Exact-match accuracy per question type on the synthetic held-out set (the trained tiny LLaVA's task)."""
    from .io_safe import write_atomic
    from .package import MANIFEST_NAME
    from .synthetic.evaluate import evaluate, format_table, overall, package_answerer, torch_answerer

    _positive(n, "--n")
    _positive(max_new_tokens, MAX_NEW_TOKENS)
    _positive(threads, "--threads")
    pruning = _prune(prune)
    if not target.exists():
        raise FileNotFoundError(f"{target} not found")
    _check_output_file(output)  # now, not after minutes of answering
    if (target / MANIFEST_NAME).is_file():
        answer = package_answerer(target, backend=backend, max_new_tokens=max_new_tokens, threads=threads,
                                  prune=pruning)
    elif pruning.active:
        raise UsageError(f"{PRUNE} prunes in the runtime: give a model package (llava-edge export "
                         f"{display(target)} -o DIR), not a checkpoint")
    else:
        answer = torch_answerer(target, max_new_tokens=max_new_tokens, threads=threads)
    results = evaluate(answer, n=n, progress=True)
    out.print(format_table(results), markup=False, soft_wrap=True)
    out.print(f"overall: {100 * overall(results):.2f}%", markup=False)
    if output:
        write_atomic(output, json.dumps(results, indent=2))  # whole or not at all: never an empty file


@app.command()
@friendly
def demo(
    workdir: Optional[Path] = typer.Option(None, help="Keep the demo's checkpoint and package here "
                                           "(default: a temporary directory)."),
    max_new_tokens: int = typer.Option(16, MAX_NEW_TOKENS, help="Generate at most this many tokens in the answer."),
) -> None:
    """The whole path on a built-in model, no files needed: checkpoint -> export -> verify -> answer."""
    from .package import check_output_dir, check_writable

    _positive(max_new_tokens, "--max-new-tokens")
    if workdir is not None:
        _utf8_path(workdir, "--workdir")
        check_writable(workdir / "package")
        check_output_dir(workdir / "package", overwrite=True)  # replaced only if it is a package of ours
    from .demo import run_demo

    with _writing(workdir or Path(tempfile.gettempdir())), \
            tempfile.TemporaryDirectory(prefix="llava-edge-demo-") as tmp:
        run_demo(Path(workdir) if workdir else Path(tmp), max_new_tokens=max_new_tokens, console=out)


@app.command()
@friendly
@_with_settings(RAY_SETTINGS, after="ray", into="ray_options")
@_with_settings(SERVE_SETTINGS, after="package")
def serve(
    package: Optional[Path] = typer.Argument(None, help="Model package directory (default: the built-in tiny "
                                             "LLaVA, exported once into a cache directory; needs the export "
                                             "extra)."),
    settings: dict = None,  # every ServeConfig option (serve/settings.py): --host ... --shutdown-timeout
    ray: bool = typer.Option(False, "--ray", help="Serve through Ray Serve: replicas over one or many machines "
                             "(PACKAGE may be several directories separated by commas, chosen by `model`)."),
    ray_options: dict = None,  # every RayOptions field (serve/settings.py): --replicas ... --health-check-period-s
    ray_address: Optional[str] = typer.Option(None, help="With --ray: 'auto' (a running cluster on this machine) "
                                              "or ray://HOST:10001; default: start a local cluster."),
    write_config: Optional[Path] = typer.Option(None, help="With --ray: write a serve config YAML for "
                                                "`serve deploy FILE` and exit."),
) -> None:
    """Serve the package over an OpenAI-compatible HTTP API (continuous batching) and a kiosk page at /.

    On by default: requests must name this server in Host (DNS rebinding), come from its own page or no
    page (Origin), and POST JSON; slow or oversized requests are cut off before they cost the model time.
    docs/serving.md lists every limit."""
    from .serve.settings import check_api_key

    if settings["api_key"] is None and API_KEY_ENV in os.environ:  # click treats an empty variable as unset
        check_api_key(os.environ[API_KEY_ENV], API_KEY_ENV)
    host, port = settings["host"], settings["port"]
    if ray or write_config is not None:
        if package is None:
            package = _builtin_package()
        forwarded = {s.name: settings[s.name] for s in SERVE_SETTINGS if s.ray and settings[s.name] != ()}
        return _serve_ray(package, host, port, ray_address, write_config,
                          {"package": str(package), **forwarded, **ray_options})
    given = [s.flag for s in RAY_SETTINGS if ray_options[s.name] is not None]
    given += ["--ray-address"] if ray_address else []
    if given:
        raise UsageError(f"{', '.join(given)}: need --ray")
    try:
        from .serve.server import serve as run_server
        from .serve.settings import ServeConfig
    except ImportError as e:
        raise UsageError(f"serving needs the serve extra: pip install 'llava-edge[serve]' ({e})") from None

    config = ServeConfig(package or Path("tiny-llava"), model_name="" if package else "tiny-llava", **settings)
    if package is None:
        config.validate()  # a bad flag is refused before the first start's export
        config.package = _builtin_package()
    from .serve.hints import slots_hint

    hint = slots_hint(config.package, config.backend)
    if hint:
        console.print(f"[yellow]note:[/] {escape(hint)}", highlight=False, soft_wrap=True)
    run_server(config)


def _builtin_package() -> Path:
    """`serve` with no PACKAGE: the built-in model's cached package (exported on first use)."""
    from .demo import builtin_package, cache_root

    with _writing(cache_root()):
        return builtin_package(say=lambda line: console.print(escape(line), highlight=False, soft_wrap=True))



def _serve_ray(package: Path, host: str, port: int, address: Optional[str], write_config: Optional[Path],
               args: dict) -> None:
    if args["replicas"] is not None and args["autoscale"] is not None:
        raise UsageError("give --replicas or --autoscale, not both")
    if address is not None and address != "auto" and not address.startswith("ray://"):
        raise UsageError(f"--ray-address {address!r}: use auto or ray://HOST:10001")
    try:
        from .serve import ray_app
    except ImportError as e:
        raise UsageError(f"--ray needs the ray extra: pip install 'llava-edge[ray]' ({e})") from None
    args = {k: v for k, v in args.items() if v is not None}
    if write_config is not None:
        for p in str(package).split(","):
            if not Path(p).is_dir():
                raise UsageError(f"package {p} is not a directory")
        args["package"] = ",".join(str(Path(p).resolve()) for p in str(package).split(","))
        write_config.write_text(ray_app.config_yaml(args, host=host, port=port))
        console.print(f"wrote {write_config}: deploy it with `serve deploy {write_config}` on a running cluster")
        return
    ray_app.run(args, address, host, port)

@app.command("bench-serve")
@friendly
def bench_serve_cmd(
    package: Optional[Path] = typer.Argument(None, help="Package to serve (omit with --url)."),
    url: Optional[str] = typer.Option(None, help="Measure a running server instead of starting one."),
    server_pid: Optional[int] = typer.Option(None, help="With --url: the server's pid, for RSS."),
    clients: str = typer.Option("1,2,4,8", help="Comma list of concurrent client counts."),
    requests: int = typer.Option(4, help="Streaming requests per client per level."),
    max_new_tokens: int = typer.Option(32, MAX_NEW_TOKENS, "--max-tokens", help="Tokens generated per request, "
                                       "sent as its max_tokens (eos ignored, so exactly this many; --max-tokens: "
                                       "its old name)."),
    max_slots: int = typer.Option(8, help="The started server's --max-slots."),
    backend: str = typer.Option("auto", help="The started server's --backend."),
    threads: Optional[int] = typer.Option(2, help="The started server's --threads."),
    prefill_chunk: Optional[int] = typer.Option(None, help="The started server's --prefill-chunk (default: serve's)."),
    server_arg: list[str] = typer.Option([], help="More flags for the started server (repeatable), e.g. "
                                         "--server-arg=--image-cache-mb=0."),
    arrival: int = typer.Option(128, help="Also measure a request arriving while 3 streams of this many tokens "
                                "decode (0: skip)."),
    soak: int = typer.Option(0, help="Then N mixed requests (some cancelled, some malformed)."),
    scaling: bool = typer.Option(False, "--decode-scaling", help="Also time the engine's decode call with 1..N "
                                 "running sequences in-process, next to static batches (needs PACKAGE)."),
    name: str = typer.Option("serve", help="Output names: benchmarks/results/NAME.{json,md,png}."),
    out_dir: Path = typer.Option(Path("benchmarks/results"), help="Output directory."),
    prune: str = _prune_option(),
) -> None:
    """Load benchmark of `serve`: N concurrent streaming clients (tok/s, TTFT, per-token, RSS, errors)."""
    from .benchmarks.serve_load import bench_serve

    if (package is None) == (url is None):
        raise UsageError("give a PACKAGE to serve or --url of a running server (one of them)")
    _positive(max_new_tokens, _typed(MAX_NEW_TOKENS, "--max-tokens"))
    pruning = _prune(prune)
    bench_serve(package, url, [int(x) for x in clients.split(",")], requests, max_new_tokens, max_slots, threads,
                backend, arrival, soak, server_pid, name, out_dir, prefill_chunk=prefill_chunk, scaling=scaling,
                server_args=server_arg, prune=str(pruning) if pruning.active else None,
                progress=lambda s: console.print(f"[dim]{escape(s)}[/]"))


@app.command()
@friendly
def watch(
    package: Path = typer.Argument(..., help="Model package directory."),
    source: str = typer.Option(..., "--source", "-s", help="Video file, camera (/dev/videoN), stream "
                               "(rtsp://...) or a directory of images."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The question asked about every sampled frame."),
    every: float = typer.Option(1.0, "--every", help="Seconds of source time between sampled frames (a directory: "
                                "one image per interval)."),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="Answers are JSON validating against "
                                               "this JSON-schema file."),
    threshold: float = typer.Option(1.0, help="A frame whose mean absolute RGB difference (0-255) from the last "
                                    "answered frame is below this reuses that answer (0: identical frames only)."),
    max_new_tokens: int = typer.Option(64, MAX_NEW_TOKENS, help="Generate at most this many tokens per answer."),
    max_frames: Optional[int] = typer.Option(None, help="Stop after this many sampled frames."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    threads: Optional[int] = typer.Option(None, help="onnxruntime intra-op threads."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (ort: both, with onnxruntime-gpu for cuda; ort-fast*: "
                                         "cpu; tensorrt: cuda); default: the backend's first."),
    prune: str = _prune_option(),
) -> None:
    """Ask one question about a video, camera or stream: one JSON line per sampled frame (greedy answers)."""
    from .runtime.pipeline import Pipeline
    from .watch.loop import WatchConfig, watch as watch_loop
    from .watch.sources import open_frames

    _in_range(every, "--every", 0, lo_open=True)
    _in_range(threshold, "--threshold", 0, 255)
    _positive(max_new_tokens, "--max-new-tokens")
    _positive(max_frames, "--max-frames")
    _positive(threads, "--threads")
    schema = _load_schema(json_schema)
    pruning = _prune(prune)
    frames = open_frames(source, every)  # a missing source fails before the model loads
    pipe = Pipeline.from_package(package, backend=backend, device=device, threads=threads, prune=pruning)
    cfg = WatchConfig(prompt, threshold, max_new_tokens, schema, max_frames)
    for record in watch_loop(pipe, frames, cfg):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":  # pragma: no cover
    app()
