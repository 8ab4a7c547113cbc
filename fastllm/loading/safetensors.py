"""Load a Hugging Face model directory: config.json (+ generation_config.json), and the weights in
model.safetensors or shards listed by model.safetensors.index.json, read through the `safetensors`
package's memory map one tensor at a time (each is converted to the target dtype/device as it is read,
so the file is never held in memory twice)."""
from __future__ import annotations

import glob
import os

import torch
from safetensors import SafetensorError, safe_open

from ..models import ModelConfig, build_model
from ..models.config import read_json
from .names import IGNORED_SUFFIXES, check_layer_count, from_hf_layout, name_map, parameter_shapes
from .progress import progress

INDEX_FILE = "model.safetensors.index.json"


def weight_files(path: str) -> list[str]:
    """The safetensors files of a model directory: the shards of the index, else every *.safetensors."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map'")
        root = os.path.realpath(path)
        for key, f in weight_map.items():
            if not isinstance(f, str) or not f:
                raise ValueError(f"{index}: weight_map[{key!r}] must be a file name, got {f!r}")
            if os.path.commonpath([root, os.path.realpath(os.path.join(root, f))]) != root:
                raise ValueError(f"{index}: weight_map[{key!r}] = {f!r} points outside the model directory")
        files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f}, a shard listed in {index}, does not exist")
        return files
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


def _read(files: list[str], names: dict[str, str], arch: str, device, dtype) -> dict[str, torch.Tensor]:
    """{fastllm name: tensor} from the files, renamed through `names` and laid out as the model wants."""
    out = {}
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                keys = list(sf.keys())
                for key in progress(keys, len(keys), f"loading {os.path.basename(f)}"):
                    if key.endswith(IGNORED_SUFFIXES):
                        continue
                    if key not in names:
                        raise ValueError(f"{f} holds tensor {key!r}, which this architecture does not have")
                    t = from_hf_layout(arch, names[key], sf.get_tensor(key))
                    out[names[key]] = t.to(device=device, dtype=dtype).contiguous()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return out


def _tensor_names(files: list[str]) -> list[str]:
    """The tensor names in the files (their headers only)."""
    names = []
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                names += sf.keys()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return names


def load_hf_dir(path: str, device, dtype: torch.dtype):
    """(model, config) from a Hugging Face model directory."""
    cfg = ModelConfig.from_hf_dir(path)
    files = weight_files(path)
    check_layer_count(cfg, _tensor_names(files), path)
    parameter_shapes(cfg, os.path.join(path, "config.json"))  # sizes too large for any tensor: refused here
    tensors = _read(files, name_map(cfg, "hf"), cfg.arch, device, dtype)
    with torch.no_grad():
        return build_model(cfg, tensors, device, dtype), cfg
