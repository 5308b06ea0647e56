"""``qat``: quantization-aware training to an int8 model (study 004)."""
