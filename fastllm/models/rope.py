"""Rotary position embeddings (RoPE) with the rope_scaling variants of Hugging Face config.json.

For head dim D, frequencies inv_freq_i = theta^(-2i / D), i < D / 2, possibly rescaled:
    linear:  inv_freq / factor                    (positions stretched by `factor`)
    llama3:  low frequencies (wavelength > original_len / low_freq_factor) divided by `factor`, high ones
             (wavelength < original_len / high_freq_factor) kept, the band between interpolated smoothly (as
             transformers computes it: with low_freq_factor == high_freq_factor the band is one wavelength,
             original_len / low_freq_factor, where the interpolation divides by zero: such a config is refused
             if a frequency falls on it, and otherwise the band is empty, a step between the two scalings)
    dynamic: NTK-aware, theta' = theta * (factor * L / L0 - (factor - 1))^(D / (D - 2)) once the sequence
             length L = max position + 1 exceeds L0 = max_position_embeddings (recomputed per call)
Angles a_{p,i} = p * inv_freq_i; cos/sin are (..., D) with the D/2 angles repeated twice (the
"rotate_half" layout of HF checkpoints: the first and second halves of a head form the pairs):
    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]
The angles are computed in float32 and cast to x's dtype, as transformers does.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """theta^(-2i / dim) for i < dim / 2, float32 on the CPU (also while a model is built on the meta device, so
    that the frequencies can be checked): (dim / 2,)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = torch.where(medium, smoothed, scaled)
    if not torch.isfinite(inv_freq).all():   # low == high and a wavelength on the band's edge: 0 / 0
        raise ValueError(f"rope_scaling low_freq_factor == high_freq_factor == {low} puts a frequency's wavelength "
                         f"exactly on original_max_position_embeddings / low_freq_factor = {old_len / low}, where "
                         f"llama3 scaling divides 0 by 0 (transformers computes NaN): make high_freq_factor larger")
    return inv_freq


class Rotary(torch.nn.Module):
    """cos, sin = rotary(positions) for positions (...) int64 -> two (..., D) float32 tensors."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        s, kind = cfg.rope_scaling, cfg.rope_type
        inv_freq = _base_inv_freq(cfg.rope_theta, cfg.head_dim)
        if kind == "linear":
            inv_freq = inv_freq / s["factor"]
        elif kind == "llama3":
            inv_freq = _llama3(inv_freq, s)
        # (to the device a new tensor gets here: get_default_device ignores `with torch.device(...)` before torch 2.8)
        self.register_buffer("inv_freq", inv_freq.to(torch.empty(0).device), persistent=False)

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        cfg = self.cfg
        base_len = cfg.max_seq_len
        if seq_len <= base_len:
            return self.inv_freq
        factor, d = cfg.rope_scaling["factor"], cfg.head_dim
        theta = cfg.rope_theta * ((factor * seq_len / base_len) - (factor - 1)) ** (d / (d - 2))
        return _base_inv_freq(theta, d).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (*positions.shape, D) float32. seq_len: the sequence length the dynamic (NTK) variant
        scales for (default: the largest position + 1, as transformers does per forward call)."""
        inv_freq = self.inv_freq
        if self.cfg.rope_type == "dynamic":
            inv_freq = self._dynamic_inv_freq(seq_len or int(positions.max()) + 1)
        angles = positions.float()[..., None] * inv_freq            # (..., D/2)
        angles = torch.cat((angles, angles), dim=-1)                 # (..., D)
        return angles.cos(), angles.sin()

    def table(self, n_positions: int, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (n_positions, D) float32 for positions 0..n_positions-1 (kv_cache_append's tables)."""
        return self(torch.arange(n_positions, device=self.inv_freq.device), seq_len or n_positions)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., H, D); cos, sin: (..., D) float32 (broadcast over the heads) -> rope(x) in x's dtype."""
    cos, sin = cos.to(x.dtype)[..., None, :], sin.to(x.dtype)[..., None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
