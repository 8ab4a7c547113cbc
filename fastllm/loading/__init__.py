"""Model loading: Hugging Face directories (safetensors.py), GGUF files (gguf.py), tokenizers (tokenizer.py)."""
