"""lmms-quant: which part of a vision-language model can take quantization, measured with lmms-eval."""

__version__ = "0.1.0"
