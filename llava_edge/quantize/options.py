"""`llava-edge quantize`'s options, defined once: ``QuantizeOptions``.

Each field carries its default, its flag's help text and its check (``option()``, llava_edge/options.py):
cli.py writes the ``quantize`` verb's flags from these fields, ``quantize_package`` takes the dataclass, and
the checks run once, when it is built (it is frozen: a QuantizeOptions that exists is valid). Before, the
CLI and ``quantize_package`` each had their own defaults and their own checks, which disagreed (group sizes
up to 4096 in one, any power of two >= 16 in the other), and ``--threads`` meant torch threads in the help
but onnxruntime threads in the code; now ``threads`` and ``torch_threads`` are two fields.

Imports neither torch nor onnx: the CLI reads it at start-up.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..options import Setting, at_most, check_fields, option, settings_of

BITS = (4, 8)  # packing.SUPPORTED_BITS (which imports torch); tests/quantize holds them equal
_INT_MAX = 2**31 - 1  # a count past this is a typo
_THREADS_MAX = 4096  # as every verb's --threads


class Method(str, enum.Enum):
    """How the float weights become integers (``--method``); the value is the flag's and the manifest's."""

    GPTQ = "gptq"  # error-compensating, calibrated on the layer's real inputs
    RTN = "rtn"  # round-to-nearest: the baseline GPTQ is measured against


class QuantFormat(str, enum.Enum):
    """How the quantized decoder graph stores its weights (``--format``; docs/quantization.md)."""

    MATMULNBITS = "matmulnbits"  # onnxruntime's MatMulNBits
    QDQ = "qdq"  # DequantizeLinear + MatMul, for TensorRT


def _bits(value: int) -> str | None:
    return None if value in BITS else f"must be {' or '.join(map(str, BITS))}, not {value}"


def _group_size(value: int) -> str | None:
    """MatMulNBits and the int4 kernels take power-of-two blocks of at least 16; past 4096 is a typo."""
    if 16 <= value <= 4096 and not value & (value - 1):
        return None
    return f"must be a power of two from 16 to 4096 (e.g. 32, 64, 128), not {value}"


def _positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else f"must be a positive number, not {value}"


def _device(value: str) -> str | None:
    return None if re.fullmatch(r"cpu|cuda(:\d+)?", value) else f"{value!r}: use cpu, cuda or cuda:N"


@dataclass(frozen=True)
class QuantizeOptions:
    """Every knob of ``llava-edge quantize``: each field is a flag of the same name (``--group-size``) with
    this default and help, checked here. The package paths (``PACKAGE``, ``--checkpoint``, ``-o``) and
    ``--overwrite`` are ``quantize_package``'s arguments: where to read and write, not how to quantize."""

    calib: str | None = option(None, "LLaVA-Instruct JSON/JSONL, or a folder of images with prompts; default: "
                               "the built-in synthetic set ('synthetic'; 'shapes': the coloured-shapes one).")
    calib_images: str | None = option(None, "Image folder for a JSON/JSONL --calib (default: next to it).")
    samples: int = option(128, "Calibration conversations.", lo=1, check=at_most(_INT_MAX))
    holdout: int = option(8, "Further held-out conversations on which the quality report compares the float "
                          "and quantized packages (0: no comparison).", lo=0, check=at_most(_INT_MAX))
    bits: int = option(4, "Weight bits: 4 or 8.", check=_bits)
    group_size: int = option(128, "Quantization group along the input dim: a power of two from 16 to 4096 "
                             "(32, 64 or 128 usually).", check=_group_size)
    act_order: bool = option(True, "GPTQ column order by Hessian diagonal (static groups: no g_idx at run time).")
    method: Method = option(Method.GPTQ, "gptq or rtn (round-to-nearest baseline).")
    format: QuantFormat = option(QuantFormat.MATMULNBITS, "matmulnbits (onnxruntime) or qdq "
                                 "(DequantizeLinear+MatMul, for TensorRT).")
    damp: float = option(0.01, "GPTQ damping, a fraction of the Hessian's mean diagonal (raised 10x while the "
                         "Cholesky factorization fails; the largest used is in the manifest).", check=_positive)
    blocksize: int = option(128, "GPTQ lazy-update block, in columns.", lo=1, check=at_most(_INT_MAX))
    quantize_lm_head: bool = option(False, "Quantize lm_head too (kept fp by default).")
    max_seq_len: int | None = option(None, "Calibration conversations cut to this many tokens (default: the "
                                     "package's context).", lo=1, check=at_most(_INT_MAX))
    seed: int = option(0, "Random seed of the calibration set (which samples, the synthetic images).", lo=0,
                       check=at_most(2**32 - 1))
    from_gptq: Path | None = option(None, "Import an existing AutoGPTQ checkpoint instead (no calibration; "
                                    "its bits, group size and act order are used).")
    device: str | None = option(None, "torch device of calibration and GPTQ: cpu, cuda or cuda:N (default: "
                                "cuda when available, else cpu).", check=_device)
    threads: int | None = option(None, "onnxruntime intra-op threads of the quality report (it runs the float "
                                 "and the quantized package), as --threads in run, chat and serve.", lo=1,
                                 check=at_most(_THREADS_MAX))
    torch_threads: int | None = option(None, "torch threads of calibration and GPTQ (default: torch's own).",
                                       lo=1, check=at_most(_THREADS_MAX))

    def __post_init__(self) -> None:
        for name, kind in (("method", Method), ("format", QuantFormat)):  # a Python caller's "rtn" is Method.RTN
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                choices = ", ".join(k.value for k in kind)
                raise UsageError(f"--{name} {value!r}: use one of {choices}") from None
        if self.from_gptq is not None:
            object.__setattr__(self, "from_gptq", Path(self.from_gptq))
        check_fields(self, quantize_settings())

    @property
    def label(self) -> str:
        """The method as the manifest and the default output name record it."""
        return "gptq-import" if self.from_gptq is not None else self.method.value

    def default_output(self, package_dir: Path) -> Path:
        """Where the new package goes without ``-o``: ``PKG-METHOD-intBITS-gGROUP`` next to the input."""
        return package_dir.with_name(f"{package_dir.name}-{self.label}-int{self.bits}-g{self.group_size}")


def quantize_settings() -> tuple[Setting, ...]:
    """QuantizeOptions' fields, in declaration order (the order of ``quantize --help``)."""
    return settings_of(QuantizeOptions)
