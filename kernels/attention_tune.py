"""Per-GPU tile tuning of the attention kernels (placeholder cache; filled in below)."""
from __future__ import annotations


def tuned_config(device, kernel, dpad, fp32):
    return None
