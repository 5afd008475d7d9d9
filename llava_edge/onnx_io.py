"""Writing ONNX graphs: the IR version every graph is clamped to, when weights leave the protobuf, and
the one writer. Shared by export, quantize and the TensorRT stage, so none of them imports another for it
(``export/onnx_export.py`` re-exports these names)."""

from __future__ import annotations

from pathlib import Path

import onnx

__all__ = ["MAX_IR_VERSION", "EXTERNAL_DATA_THRESHOLD", "save_onnx"]

# onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default.
MAX_IR_VERSION = 10
# Above this the protobuf 2 GB limit is near: weights go to one external data file.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def save_onnx(model: onnx.ModelProto, path: Path, external: bool) -> list[str]:
    """Write a graph, its weights inline or in one `<name>.data` file beside it (protobuf stops at
    2 GB); stale data files of an earlier write are removed. Returns the external files written."""
    path = Path(path)
    for f in path.parent.glob(path.name + "*.data"):
        f.unlink()
    if not external:
        onnx.save_model(model, str(path))
        return []
    location = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    return [location]
