"""llava-edge: LLaVA split into ONNX graphs, quantized, compiled and served without torch."""

__version__ = "0.1.0"
