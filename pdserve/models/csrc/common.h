// Shared by the pdserve_cpu ops: pdserve/models/cpu_kernels.py builds every .cpp here into one library.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

// e^x for x <= 0 (softmax after the max is taken off): x = k ln2 + r, |r| <= ln2 / 2, e^r by its
// Taylor series to r^7 (relative error < 1e-8 before float rounding); plain arithmetic, so the
// compiler vectorizes the loop it sits in (std::exp it would call once per element)
static inline float exp_nonpos(float x) {
  x = std::max(x, -87.f);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
  float p = 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

