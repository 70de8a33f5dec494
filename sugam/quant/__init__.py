"""Weights that stay quantized in memory, and the matmuls that read them (see docs/QUANTIZATION.md)."""

from .formats import (
           INT4_GROUP,
           Int4Weight,
           Int8Weight,
           QuantizedWeight,
           quantize_int4,
           quantize_int8,
)
from .linear import QuantizedEmbedding, QuantizedLinear

__all__ = [
           "INT4_GROUP",
           "Int4Weight",
           "Int8Weight",
           "QuantizedEmbedding",
           "QuantizedLinear",
           "QuantizedWeight",
           "quantize_int4",
           "quantize_int8",
]
