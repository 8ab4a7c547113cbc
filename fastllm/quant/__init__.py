"""Weight-only quantisation: formats and the packed layout (formats.py), quantize() and
QuantizedWeight (quantize.py), exact GGUF Q8_0/Q4_0/Q4_1 conversion (gguf.py)."""
from .formats import GROUP_SIZES, SCHEMES, Format
from .gguf import from_gguf, to_gguf
from .quantize import QuantizedWeight, quantize

__all__ = ["quantize", "QuantizedWeight", "Format", "SCHEMES", "GROUP_SIZES", "from_gguf", "to_gguf"]
