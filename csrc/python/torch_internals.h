// The one place that reaches into torch's internal headers (torch/csrc/...):
// they are not a stable API, and a release that moves one would otherwise
// break every file of the Python module. Each function here has a fallback
// through torch's public API (torch/extension.h, Python calls), chosen by
// __has_include, so such a release costs speed, not the build.
// -DLAYERSEL_TORCH_PUBLIC_ONLY takes every fallback (to test them).
#pragma once

#if !defined(LAYERSEL_TORCH_PUBLIC_ONLY) && __has_include(<torch/csrc/utils/pybind.h>)
// pybind11 with torch's type casters (at::Tensor, at::ScalarType...), without
// torch/extension.h's C++ frontend (torch/all.h), which costs ~4x the parse.
#include <torch/csrc/utils/pybind.h>
#else
#include <torch/extension.h>
#endif

#include <ATen/core/Tensor.h>
#include <ATen/core/function_schema.h>
#include <ATen/core/ivalue.h>

#include <functional>
#include <vector>

namespace py = pybind11;

namespace layersel::torch_internals {

// THPVariable_Check: `obj` is a torch.Tensor (or a subclass).
bool is_tensor(PyObject* obj);

// THPVariable_Unpack: the at::Tensor of a torch.Tensor (is_tensor(obj) holds).
// A reference to the tensor the object holds, so a walk over thousands of
// tensors pays no reference-count traffic; the public fallback converts into
// `scratch` and returns that.
const at::Tensor& unpack_tensor(PyObject* obj, at::Tensor& scratch);

// The schema's argument `index` from a Python object, as torch.ops converts it
// (torch::jit::argumentToIValue); its error (RuntimeError) names the argument.
c10::IValue to_ivalue(const c10::FunctionSchema& schema, size_t index, py::handle obj);

// An op's outputs as torch.ops returns them (torch::jit::createPyObjectForStack):
// None, the one value, or a tuple.
py::object stack_to_python(std::vector<c10::IValue>&& stack);

// torch::utils::tensor_to_numpy (t.numpy()): a new reference, or null with a
// Python error set.
PyObject* tensor_to_numpy(const at::Tensor& t);

// body() with torch's translation of C++ errors and warnings to Python's
// (HANDLE_TH_ERRORS): c10::ValueError as ValueError, TypeError as TypeError...
py::object translating_errors(const std::function<py::object()>& body);

}  // namespace layersel::torch_internals
