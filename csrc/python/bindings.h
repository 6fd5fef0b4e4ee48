// What the files of the Python module layersel_ext._C share: the held tensors,
// the test for tensors whose headers they may make themselves, and each file's
// bind_* (module.cpp calls them).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/TensorImpl.h>

#include <vector>

#include "python/torch_internals.h"  // pybind11 with torch's type casters

namespace layersel::python {

// A dense tensor of no Python subclass: the helpers may make its headers (or
// arrays) themselves; anything else (a tensor subclass such as DTensor,
// sparse, nested) goes through its own dispatched method.
inline bool plain(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.unsafeGetTensorImpl()->key_set();
  return t.layout() == c10::kStrided && !t.is_nested() && !keys.has(c10::DispatchKey::Python) &&
         !keys.has(c10::DispatchKey::PythonTLSSnapshot);
}

// A model's state tensors held in C++ (detached headers, made by the state
// walk): the ops take them as their Tensor[] (call_op) and Python makes a
// tensor object only for the entries it reads (__getitem__). On many_small
// (2,100 tensors) making and freeing a Python tensor per entry cost ~1 ms per
// model, more than the walk and the detach together. Hidden as pybind11's own
// types are: the class bound to Python is private to this module.
struct __attribute__((visibility("hidden"))) HeldTensors {
  std::vector<at::Tensor> tensors;
};

// held_tensors.cpp: HeldTensors, state_items, detach_all, flatten_dense, views_like
void bind_held_tensors(py::module_& m);
void bind_call_op(py::module_& m);       // call_op.cpp
void bind_numpy_arrays(py::module_& m);  // numpy_arrays.cpp: numpy_all

}  // namespace layersel::python
