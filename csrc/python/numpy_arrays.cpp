// _C.numpy_all: t.numpy() for each tensor, through numpy's C API where setup.py
// found numpy's headers (LAYERSEL_WITH_NUMPY), else through torch.
#include <c10/core/Storage.h>

#include <vector>

#include "python/bindings.h"

#ifdef LAYERSEL_WITH_NUMPY
// numpy's C API, this file only (setup.py adds numpy's headers when numpy is
// installed at build time).
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#endif

namespace layersel::python {
namespace {

#ifdef LAYERSEL_WITH_NUMPY
bool numpy_ready() {  // numpy's C API, imported on first use (never at import of _C)
  static const bool ready = [] {
    if (_import_array() < 0) {
      PyErr_Clear();  // numpy missing or of another ABI: torch makes the arrays
      return false;
    }
    return true;
  }();
  return ready;
}

int numpy_type(c10::ScalarType dtype) {  // -1: not one numpy_all makes itself
  switch (dtype) {
    case c10::kBool: return NPY_BOOL;
    case c10::kByte: return NPY_UINT8;
    case c10::kChar: return NPY_INT8;
    case c10::kShort: return NPY_INT16;
    case c10::kInt: return NPY_INT32;
    case c10::kLong: return NPY_INT64;
    case c10::kHalf: return NPY_FLOAT16;
    case c10::kFloat: return NPY_FLOAT32;
    case c10::kDouble: return NPY_FLOAT64;
    case c10::kComplexFloat: return NPY_COMPLEX64;
    case c10::kComplexDouble: return NPY_COMPLEX128;
    default: return -1;
  }
}

void release_storage(PyObject* capsule) { delete static_cast<c10::Storage*>(PyCapsule_GetPointer(capsule, nullptr)); }
#endif

// t.numpy() of a CPU tensor free of autograd: the same dtype, shape, strides
// and memory, writeable. With numpy's C API the array's base is a capsule
// holding the tensor's storage (a reference to the memory, as t.numpy()'s base
// tensor holds it, so p.data = ... elsewhere leaves the array valid) instead
// of a Python tensor: ~0.8 us per array less than torch's tensor_to_numpy,
// which other dtypes and conjugate/negative views still go through.
PyObject* numpy_of(const at::Tensor& t) {
#ifdef LAYERSEL_WITH_NUMPY
  const int type = numpy_type(t.scalar_type());
  if (type >= 0 && !t.is_conj() && !t.is_neg() && numpy_ready()) {
    const int ndim = static_cast<int>(t.dim());
    std::vector<npy_intp> dims(t.sizes().begin(), t.sizes().end()), strides(ndim);
    for (int d = 0; d < ndim; ++d) strides[d] = static_cast<npy_intp>(t.stride(d) * t.element_size());
    PyObject* array = PyArray_New(&PyArray_Type, ndim, dims.data(), type, strides.data(), t.data_ptr(), 0,
                                  NPY_ARRAY_ALIGNED | NPY_ARRAY_WRITEABLE, nullptr);
    if (array == nullptr) return nullptr;
    if (t.data_ptr() == nullptr) return array;  // no memory to hold (an empty tensor)
    auto* storage = new c10::Storage(t.storage());
    PyObject* base = PyCapsule_New(storage, nullptr, &release_storage);
    if (base == nullptr) {
      delete storage;
      Py_DECREF(array);
      return nullptr;
    }
    if (PyArray_SetBaseObject(reinterpret_cast<PyArrayObject*>(array), base) < 0) {  // steals base
      Py_DECREF(array);
      return nullptr;
    }
    storage->unsafeGetStorageImpl()->set_resizable(false);  // as tensor_to_numpy: the array owns no resize
    return array;
  }
#endif
  return torch_internals::tensor_to_numpy(t);
}

// t.numpy() for each tensor (zero copy; each array keeps its memory alive), or
// None when one is not a CPU tensor free of autograd (the caller's Python path
// then moves or detaches it): ~1 us per tensor less than t.numpy() from Python.
py::object numpy_all(const std::vector<at::Tensor>& tensors) {
  for (const at::Tensor& t : tensors)
    if (!t.device().is_cpu() || t.requires_grad() || !plain(t)) return py::none();  // a subclass: its own numpy()
  py::list out(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    PyObject* array = numpy_of(tensors[i]);
    if (array == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), array);  // steals the reference
  }
  return out;
}

}  // namespace

void bind_numpy_arrays(py::module_& m) {
  m.def("numpy_all", [](const HeldTensors& held) { return numpy_all(held.tensors); });
  m.def("numpy_all", &numpy_all, "t.numpy() for each CPU tensor, or None when one is not CPU or needs grad");
}

}  // namespace layersel::python
