"""Inference runtime: the static KV cache, sampling, and the generation loop."""
