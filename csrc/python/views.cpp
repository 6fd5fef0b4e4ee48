// Flat buffers and views made without a dispatched view per tensor
// (common/tensor_headers.h): flatten_dense and views_like.
#include <ATen/ops/cat.h>
#include <c10/util/Exception.h>

#include <vector>

#include "common/tensor_headers.h"
#include "python/bindings.h"

namespace layersel::python {
namespace {

// torch._utils._flatten_dense_tensors (torch.cat of every t.view(-1)) without
// a dispatched view per tensor: a flat header on each plain contiguous tensor
// (a reshape for any other), then one at::cat. In the H200 profile of
// many_small's layer selection, 1,402 aten::view took 1.2 of the flatten's 3.2 ms.
at::Tensor flatten_dense(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> flat;
  flat.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    const bool header = plain(t) && t.is_contiguous() && !t.requires_grad();
    flat.push_back(header ? layersel::contiguous_header(t, {t.numel()}, 0) : t.reshape({-1}));
  }
  return flat.size() == 1 ? flat[0] : at::cat(flat);  // one tensor: a view, as torch's
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

void bind_views(py::module_& m) {
  m.def("flatten_dense", &flatten_dense, "torch.cat of every tensor flattened, without a view per tensor");
  m.def("views_like", [](const std::vector<at::Tensor>& buffers, const HeldTensors& like) {
    return views_like(buffers, like.tensors);
  });
  m.def("views_like", &views_like, "Views of flat per-dtype buffers shaped like each tensor of `like`");
}

}  // namespace layersel::python
