// Argument checks for the C++ entry points: a failed check throws, pybind11 turns
// std::invalid_argument into Python's ValueError. Kernels never abort the process.
#pragma once
#include <stdexcept>
#include <string>

#define FASTLLM_CHECK(cond, msg)                                              \
  do {                                                                        \
    if (!(cond)) throw std::invalid_argument(std::string("fastllm._C: ") + (msg)); \
  } while (0)
