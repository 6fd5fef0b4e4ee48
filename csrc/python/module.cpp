// The Python module layersel_ext._C: loading it registers the ops (ops.cpp and
// the kernels are linked into it); it also reports how it was built. The
// per-tensor helpers live one job a file beside this one (bindings.h).
#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <torch/version.h>

#include <mutex>
#include <set>

#include "common/dtypes.h"
#include "cpu/sparse_select_offsets.h"
#include "cpu/wire_coo.h"
#include "cpu/wire_masks.h"
#include "python/bindings.h"

namespace {

#ifndef LAYERSEL_CUDA_ARCH_LIST
#define LAYERSEL_CUDA_ARCH_LIST ""
#endif

py::dict build_info() {
  py::dict info;
  info["torch_version"] = TORCH_VERSION;
#ifdef LAYERSEL_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_arch_list"] = LAYERSEL_CUDA_ARCH_LIST;
  py::list dtypes;  // what the kernels read, from the one dtype table (csrc/common/dtypes.h)
#define LS_DTYPE_NAME_(code, type, scalar, out) out.append(c10::toString(scalar));
  LS_DTYPES(LS_DTYPE_NAME_, dtypes)
#undef LS_DTYPE_NAME_
  info["dtypes"] = dtypes;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(__VERSION__)
  info["cxx"] = __VERSION__;
#endif
  return info;
}

// How many distinct threads at::parallel_for uses here: an extension built
// without -fopenmp silently runs its parallel regions on one thread.
int64_t cpu_threads_used(int64_t items) {
  std::mutex mu;
  std::set<int> ids;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    volatile double sink = 0;
    for (int64_t i = begin; i < end; ++i)
      for (int k = 0; k < 200000; ++k) sink = sink + k;
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(ids.size());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "layersel_ext compiled kernels (ops are registered as torch.ops.layersel.*)";
  m.def("build_info", &build_info, "How this module was compiled");
  m.def("cpu_threads_used", &cpu_threads_used, "Distinct threads used by at::parallel_for over `items`");
  layersel::python::bind_held_tensors(m);
  layersel::python::bind_call_op(m);
  layersel::python::bind_numpy_arrays(m);
  // The compact COO wire codec (layersel_ext/wire_coo.py), without the GIL.
  m.def("coo_encode", &layersel::coo_encode, "Compact COO positions and value bytes (cpu/wire_coo.h)",
        py::call_guard<py::gil_scoped_release>());
  m.def("coo_decode", &layersel::coo_decode, "fl4health's COO indices and value bytes from a compact stream",
        py::call_guard<py::gil_scoped_release>());
  m.def("sparse_select_offsets", &layersel::sparse_select_offsets,
        "sparse_select's values and flat offsets, for coo_encode (cpu/sparse_select_offsets.h)",
        py::call_guard<py::gil_scoped_release>());
  // The coded FedPM mask codec (layersel_ext/wire_coded.py) and bitmap helpers, without the GIL.
  m.def("mask_prior", &layersel::mask_prior, "A layer's quantized prior from theta (cpu/wire_masks.h)",
        py::call_guard<py::gil_scoped_release>());
  m.def("mask_encode", &layersel::mask_encode, "Coded masks from a bitmap and the layers' priors",
        py::call_guard<py::gil_scoped_release>());
  m.def("mask_decode", &layersel::mask_decode, "A bitmap from coded masks and the layers' priors",
        py::call_guard<py::gil_scoped_release>());
  m.def("bits_expand", &layersel::bits_expand, "A bitmap's bits as 0/1 integers, in a new tensor",
        py::call_guard<py::gil_scoped_release>());
  m.def("bits_gather", &layersel::bits_gather, "Ranges of a bitmap, concatenated",
        py::call_guard<py::gil_scoped_release>());
}
