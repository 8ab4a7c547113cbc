"""fastllm (being built)."""
