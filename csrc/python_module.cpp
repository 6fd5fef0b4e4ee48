// The Python module layersel_ext._C: loading it registers the ops (ops.cpp and
// the kernels are linked into it); it also reports how it was built.
#include <ATen/Parallel.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/tensor_numpy.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

#ifdef LAYERSEL_WITH_NUMPY
// numpy's C API for numpy_all's arrays, this file only (setup.py adds numpy's headers when numpy
// is installed at build time; without them numpy_all makes every array through torch).
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#endif

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

// A dense tensor of no Python subclass: the helpers below may make its headers
// (or arrays) themselves; anything else (a tensor subclass such as DTensor,
// sparse, nested) goes through its own dispatched method.
bool plain(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.unsafeGetTensorImpl()->key_set();
  return t.layout() == c10::kStrided && !t.is_nested() && !keys.has(c10::DispatchKey::Python) &&
         !keys.has(c10::DispatchKey::PythonTLSSnapshot);
}

// t.detach(): a new header on the same storage, sharing the version counter,
// without autograd (what detach() does for a dense tensor).
at::Tensor detached(const at::Tensor& t) {
  if (!plain(t)) return t.detach();
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return at::Tensor(impl->shallow_copy_and_detach(impl->version_counter(), /*allow_tensor_metadata_change=*/false));
}

std::vector<at::Tensor> detach_all(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(detached(t));
  return out;
}

// A model's state tensors held in C++ (detached headers, made by StateWalk): the
// ops take them as their Tensor[] (call_op) and Python makes a tensor object only
// for the entries it reads (__getitem__). On many_small (2,100 tensors) making
// and freeing a Python tensor per entry cost ~1 ms per model here, more than
// the walk and the detach together.
struct HeldTensors {
  std::vector<at::Tensor> tensors;
};

at::Tensor held_at(const HeldTensors& held, int64_t i) {  // Python's indexing: negative from the end
  const int64_t n = static_cast<int64_t>(held.tensors.size());
  if (i < 0) i += n;
  if (i < 0 || i >= n) throw py::index_error("HeldTensors index out of range");
  return held.tensors[static_cast<size_t>(i)];
}

// torch.ops.layersel.<name>(*args), with HeldTensors passed as the Tensor[] they
// hold (no Python tensor per element): each other argument converted by the
// schema as torch.ops converts it (its error names the argument), trailing
// ones left out take the schema's defaults. Like torch.ops it releases the GIL
// while the op runs and raises the op's errors as their Python types
// (ValueError, TypeError...); the dispatcher does the rest as for any call.
// What it skips is __torch_function__ (ops._call goes through torch.ops when a
// mode or an overriding tensor wants it).
py::object call_op(const std::string& name, const py::args& args) {
  HANDLE_TH_ERRORS
  const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(("layersel::" + name).c_str(), "");
  const c10::FunctionSchema& schema = op.schema();
  const std::vector<c10::Argument>& params = schema.arguments();
  TORCH_CHECK_TYPE(args.size() <= params.size(), "layersel::", name, " takes ", params.size(), " arguments, got ",
                   args.size());
  torch::jit::Stack stack;
  stack.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (i >= args.size()) {
      TORCH_CHECK_TYPE(params[i].default_value().has_value(), "layersel::", name, " missing argument '",
                       params[i].name(), "'");
      stack.push_back(*params[i].default_value());
    } else if (py::isinstance<HeldTensors>(args[i])) {
      stack.emplace_back(c10::List<at::Tensor>(args[i].cast<const HeldTensors&>().tensors));
    } else {
      stack.push_back(torch::jit::argumentToIValue(schema, i, args[i]));
    }
  }
  {
    py::gil_scoped_release no_gil;
    op.callBoxed(&stack);
  }
  return torch::jit::createPyObjectForStack(std::move(stack));
  END_HANDLE_TH_ERRORS_PYBIND
}

// _model_state's walk of a module tree in one call: (names, detached tensors)
// exactly as list(model.state_dict().items()) holds them (parameters, then
// persistent buffers, then children, depth first, "a.b." prefixes), or None
// when state_dict() must run instead: a module customises it (the class
// overrides state_dict, _save_to_state_dict or get_extra_state, or the module
// has state_dict hooks), an entry is not a tensor, or a name repeats. The
// Python walk (_model_state._collect) is its twin for the torch backend and
// under torch.compile. On many_small (2,100 tensors) the Python walk and the
// detach took ~3 ms per model here; the rules are the same. The tensors come
// back as HeldTensors, or as a list when one is not plain (a DTensor, another
// subclass: _sharded reads those from Python).
py::str concat(const py::str& a, const py::handle& b) {  // a + b, b a str (else TypeError, as in Python)
  PyObject* joined = PyUnicode_Concat(a.ptr(), b.ptr());
  if (joined == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(joined);
}

class StateWalk {
 public:
  StateWalk(py::handle base_state_dict, py::handle base_save, py::handle base_extra_state)
      : bases_{base_state_dict, base_save, base_extra_state} {}

  py::object run(py::handle module) {
    if (!visit(module, py::str(""))) return py::none();
    if (static_cast<size_t>(py::len(seen_)) != py::len(names_)) return py::none();
    if (all_plain_) return py::make_tuple(names_, std::move(held_));
    return py::make_tuple(names_, py::cast(held_.tensors));
  }

 private:
  // The attributes nn.Module.__init__ puts in the instance's __dict__, looked up there with
  // interned keys (a getattr by C string makes and hashes a new str every time).
  enum Attr { kParameters, kBuffers, kModules, kNonPersistent, kHooks, kPreHooks, kAttrs };
  static PyObject* key(Attr a) {
    static PyObject* const keys[kAttrs] = {
        PyUnicode_InternFromString("_parameters"), PyUnicode_InternFromString("_buffers"),
        PyUnicode_InternFromString("_modules"), PyUnicode_InternFromString("_non_persistent_buffers_set"),
        PyUnicode_InternFromString("_state_dict_hooks"), PyUnicode_InternFromString("_state_dict_pre_hooks")};
    return keys[a];
  }

  bool overridden(PyTypeObject* type) {  // per class, once per walk
    auto cached = by_type_.find(type);
    if (cached == by_type_.end()) {
      static const char* const kOverridable[] = {"state_dict", "_save_to_state_dict", "get_extra_state"};
      bool any = false;
      for (int i = 0; i < 3; ++i)
        any = any || !py::getattr(py::handle(reinterpret_cast<PyObject*>(type)), kOverridable[i]).is(bases_[i]);
      cached = by_type_.emplace(type, any).first;
    }
    return cached->second;
  }

  static bool truthy(const py::object& o) {
    const int r = PyObject_IsTrue(o.ptr());
    if (r < 0) throw py::error_already_set();
    return r != 0;
  }

  // A dict's (key, value) pairs, each held, in order (a snapshot: the walk never sees a change).
  static std::vector<std::pair<py::object, py::object>> entries(const py::object& dict) {
    std::vector<std::pair<py::object, py::object>> out;
    PyObject* k = nullptr;
    PyObject* v = nullptr;
    for (Py_ssize_t pos = 0; PyDict_Next(dict.ptr(), &pos, &k, &v);)
      out.emplace_back(py::reinterpret_borrow<py::object>(k), py::reinterpret_borrow<py::object>(v));
    return out;
  }

  bool add(const py::str& name, PyObject* value) {
    if (!THPVariable_Check(value)) return false;
    names_.append(name);
    seen_.add(name);
    held_.tensors.push_back(detached(THPVariable_Unpack(value)));
    all_plain_ = all_plain_ && plain(held_.tensors.back());
    return true;
  }

  // False: state_dict() must run (see above), or the module is not laid out as nn.Module's.
  bool visit(py::handle module, const py::str& prefix) {
    if (overridden(Py_TYPE(module.ptr()))) return false;
    // The instance __dict__ (PyObject_GenericGetDict: public API, also for 3.12+'s managed dicts).
    PyObject* raw_dict = PyObject_GenericGetDict(module.ptr(), nullptr);
    if (raw_dict == nullptr) {
      PyErr_Clear();  // no __dict__: not laid out as nn.Module's
      return false;
    }
    const py::object dict = py::reinterpret_steal<py::object>(raw_dict);
    // Every object below is held (a strong reference) while in use: a tensor subclass's detach
    // runs Python code, which could change the module meanwhile.
    py::object attrs[kAttrs];
    for (int a = 0; a < kAttrs; ++a) {
      PyObject* found = PyDict_GetItemWithError(dict.ptr(), key(static_cast<Attr>(a)));
      if (found == nullptr && PyErr_Occurred()) throw py::error_already_set();
      attrs[a] = py::reinterpret_borrow<py::object>(found);  // null stays null
    }
    if (!attrs[kHooks] || truthy(attrs[kHooks]) || (attrs[kPreHooks] && truthy(attrs[kPreHooks]))) return false;
    // Exactly dicts: PyDict_Next walks a dict subclass's (an OrderedDict's) storage, not its order.
    for (int a = kParameters; a <= kModules; ++a)
      if (!attrs[a] || !PyDict_CheckExact(attrs[a].ptr())) return false;
    if (!attrs[kNonPersistent] || !PyAnySet_Check(attrs[kNonPersistent].ptr())) return false;
    for (const auto& [name, value] : entries(attrs[kParameters]))
      if (!value.is_none() && !add(concat(prefix, name), value.ptr())) return false;
    for (const auto& [name, value] : entries(attrs[kBuffers])) {
      if (value.is_none()) continue;
      const int skip = PySet_Contains(attrs[kNonPersistent].ptr(), name.ptr());
      if (skip < 0) throw py::error_already_set();
      if (!skip && !add(concat(prefix, name), value.ptr())) return false;
    }
    for (const auto& [name, child] : entries(attrs[kModules]))
      if (!child.is_none() && !visit(child, concat(concat(prefix, name), dot_))) return false;
    return true;
  }

  py::handle bases_[3];
  std::unordered_map<PyTypeObject*, bool> by_type_;
  py::list names_;
  HeldTensors held_;
  bool all_plain_ = true;
  py::set seen_;
  py::str dot_{"."};
};

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
// of a Python tensor: ~0.8 us per array less than torch::utils::tensor_to_numpy,
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
  return torch::utils::tensor_to_numpy(t);
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

py::object state_items(py::handle module, py::handle base_state_dict, py::handle base_save,
                       py::handle base_extra_state) {
  return StateWalk(base_state_dict, base_save, base_extra_state).run(module);
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
  py::class_<HeldTensors>(m, "HeldTensors", "A model's state tensors held in C++ (state_items); a read-only sequence")
      .def("__len__", [](const HeldTensors& h) { return h.tensors.size(); })
      .def("__getitem__", &held_at)
      .def("__iter__", [](const HeldTensors& h) { return py::make_iterator(h.tensors.begin(), h.tensors.end()); },
           py::keep_alive<0, 1>())
      .def("numels", [](const HeldTensors& h) {
        std::vector<int64_t> out;
        out.reserve(h.tensors.size());
        for (const at::Tensor& t : h.tensors) out.push_back(t.numel());
        return out;
      }, "t.numel() of each tensor")
      .def("dtypes", [](const HeldTensors& h) {
        std::vector<at::ScalarType> out;
        out.reserve(h.tensors.size());
        for (const at::Tensor& t : h.tensors) out.push_back(t.scalar_type());
        return out;
      }, "t.dtype of each tensor")
      .def("take", [](const HeldTensors& h, const std::vector<int64_t>& indices) {
        HeldTensors out;
        out.tensors.reserve(indices.size());
        for (const int64_t i : indices) out.tensors.push_back(held_at(h, i));
        return out;
      }, "The tensors at `indices`, held");
  m.def("call_op", &call_op, "torch.ops.layersel.<name>(*args), HeldTensors passed as their Tensor[]");
  m.def("detach_all", &detach_all, "t.detach() for each tensor, without a dispatcher call per tensor");
  m.def("state_items", &state_items,
        "(names, detached tensors) of a module's state_dict, or None where state_dict() must run");
  m.def("flatten_dense", &flatten_dense, "torch.cat of every tensor flattened, without a view per tensor");
  m.def("numpy_all", [](const HeldTensors& held) { return numpy_all(held.tensors); });
  m.def("numpy_all", &numpy_all, "t.numpy() for each CPU tensor, or None when one is not CPU or needs grad");
  m.def("views_like", [](const std::vector<at::Tensor>& buffers, const HeldTensors& like) {
    return views_like(buffers, like.tensors);
  });
  m.def("views_like", &views_like, "Views of flat per-dtype buffers shaped like each tensor of `like`");
  // The compact COO wire codec (layersel_ext/wire_coo.py), without the GIL.
  m.def("coo_encode", &layersel::coo_encode, "Compact COO positions and value bytes (cpu/wire_coo.h)",
        py::call_guard<py::gil_scoped_release>());
  m.def("coo_decode", &layersel::coo_decode, "fl4health's COO indices and value bytes from a compact stream",
        py::call_guard<py::gil_scoped_release>());
}
