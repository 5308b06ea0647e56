"""``ptq``: post-training quantization of the trained model to int8 (static) or fp16."""
