// Packed weight formats of qmatmul, shared by the CPU and CUDA kernels (fastllm/quant/formats.py
// documents the layout; Format.code gives these codes). W: (n, k) in groups of `group` along k
// (group == k for I8Channel).
//   I8Channel: w int8 (n, k), scales f32 (n, 1)            W = q * d
//   I8Group:   w int8 (n, k), scales f16 (n, k / group)    W = q * d
//   I4:        w uint8 (n, k / 2), scales f16              W = (u - 8) * d
//   I4Asym:    w uint8 (n, k / 2), scales and mins f16     W = u * d + m
// int4 rows are k / 32 blocks of 16 bytes: byte i holds element i (low nibble) and 16 + i (high).
#pragma once

namespace fastllm {

enum class QFormat : int { I8Channel = 0, I8Group = 1, I4 = 2, I4Asym = 3 };

}  // namespace fastllm
