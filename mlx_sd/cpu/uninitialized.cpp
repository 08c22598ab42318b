// New MLX arrays whose buffers are not filled: the one thing MLX's Python API cannot make.
// `mx.zeros` writes every byte, and the CPU kernels and the checkpoint reader (buffers.py,
// convert/reader.py) overwrite every byte again. Built against MLX's own headers and nanobind,
// in MLX's nanobind domain, so it takes `mlx.core.Dtype`s and returns ordinary
// `mlx.core.array`s. Optional: see setup.py and buffers.py.

#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/version.h"

namespace nb = nanobind;
namespace mx = mlx::core;

NB_MODULE(_uninitialized, m) {
  m.def(
      "empty",
      [](const std::vector<int>& shape, mx::Dtype dtype) {
        size_t count = 1;
        for (int size : shape) {
          if (size < 0) {
            throw nb::value_error("negative dimension");
          }
          count *= static_cast<size_t>(size);
        }
        return mx::array(mx::allocator::malloc(count * dtype.size()), mx::Shape(shape.begin(), shape.end()), dtype);
      },
      nb::arg("shape"), nb::arg("dtype"),
      "An evaluated array of this shape and dtype whose contents are whatever its buffer held.");
  // The version of the headers this was compiled against; the loaded libmlx must be the same.
  m.attr("mlx_version") = std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) + "." +
                          std::to_string(MLX_VERSION_PATCH);
}
