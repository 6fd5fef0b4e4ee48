// The Python module layersel_ext._C: loading it registers the ops (ops.cpp and
// the kernels are linked into it); it also reports how it was built.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <mutex>
#include <set>
#include <vector>

#include "common/dtypes.h"
#include "common/tensor_headers.h"
#include "cpu/wire_coo.h"

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

// Tensor headers made without the dispatcher (common/tensor_headers.h): a model
// of 1,000 small tensors otherwise pays a dispatched detach() or slice-and-view
// per tensor (2-3 us each from Python), more than the kernels themselves.

// t.detach() for each: a new header on the same storage, sharing the version
// counter, without autograd (what detach() does for a dense tensor). Anything
// else (a tensor subclass such as DTensor, sparse, nested) takes t.detach().
std::vector<at::Tensor> detach_all(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    const bool plain = t.layout() == c10::kStrided && !t.is_nested() &&
                       !impl->key_set().has(c10::DispatchKey::Python) &&
                       !impl->key_set().has(c10::DispatchKey::PythonTLSSnapshot);
    if (plain) {
      out.emplace_back(impl->shallow_copy_and_detach(impl->version_counter(), /*allow_tensor_metadata_change=*/false));
    } else {
      out.push_back(t.detach());
    }
  }
  return out;
}

// Views of flat per-dtype buffers (one per dtype, in any order), one per tensor
// of `like`, shaped like it, in order: ops.split_grouped's slice-and-view loop.
std::vector<at::Tensor> views_like(const std::vector<at::Tensor>& buffers, const std::vector<at::Tensor>& like) {
  std::vector<int64_t> fill(buffers.size(), 0);
  std::vector<at::Tensor> out;
  out.reserve(like.size());
  for (const at::Tensor& t : like) {
    size_t g = 0;
    while (g < buffers.size() && buffers[g].scalar_type() != t.scalar_type()) ++g;
    TORCH_CHECK(g < buffers.size(), "views_like: no buffer of dtype ", t.scalar_type());
    const at::Tensor& buf = buffers[g];
    TORCH_CHECK(buf.dim() == 1 && buf.is_contiguous(), "views_like: buffers must be flat and contiguous");
    TORCH_CHECK(fill[g] + t.numel() <= buf.numel(), "views_like: the ", t.scalar_type(), " buffer is too small");
    out.push_back(layersel::contiguous_header(buf, t.sizes(), fill[g]));
    fill[g] += t.numel();
  }
  for (size_t g = 0; g < buffers.size(); ++g) {
    TORCH_CHECK(fill[g] == buffers[g].numel(), "views_like: the ", buffers[g].scalar_type(), " buffer holds ",
                buffers[g].numel(), " elements, the tensors ", fill[g]);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "layersel_ext compiled kernels (ops are registered as torch.ops.layersel.*)";
  m.def("build_info", &build_info, "How this module was compiled");
  m.def("cpu_threads_used", &cpu_threads_used, "Distinct threads used by at::parallel_for over `items`");
  m.def("detach_all", &detach_all, "t.detach() for each tensor, without a dispatcher call per tensor");
  m.def("views_like", &views_like, "Views of flat per-dtype buffers shaped like each tensor of `like`");
  // The compact COO wire codec (layersel_ext/wire_coo.py), without the GIL.
  m.def("coo_encode", &layersel::coo_encode, "Compact COO positions and value bytes (cpu/wire_coo.h)",
        py::call_guard<py::gil_scoped_release>());
  m.def("coo_decode", &layersel::coo_decode, "fl4health's COO indices and value bytes from a compact stream",
        py::call_guard<py::gil_scoped_release>());
}
