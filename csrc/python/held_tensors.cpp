// HeldTensors (a model's state tensors held in C++), what makes them (the walk
// of a module tree, state_items; detach_all) and the flat buffers and views
// made from them (flatten_dense, views_like). Tensor headers are made without
// the dispatcher (common/tensor_headers.h): a model of 1,000 small tensors
// otherwise pays a dispatched detach(), slice or view per tensor (2-3 us each
// from Python), more than the kernels themselves.
#include <ATen/ops/cat.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Exception.h>

#include <unordered_map>
#include <utility>
#include <vector>

#include "common/tensor_headers.h"
#include "python/bindings.h"

namespace layersel::python {
namespace {

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

at::Tensor held_at(const HeldTensors& held, int64_t i) {  // Python's indexing: negative from the end
  const int64_t n = static_cast<int64_t>(held.tensors.size());
  if (i < 0) i += n;
  if (i < 0 || i >= n) throw py::index_error("HeldTensors index out of range");
  return held.tensors[static_cast<size_t>(i)];
}

// _model_state's walk of a module tree in one call: (names, detached tensors)
// exactly as list(model.state_dict().items()) holds them (parameters, then
// persistent buffers, then children, depth first, "a.b." prefixes), or None
// when state_dict() must run instead: a module customises it (the class
// overrides state_dict, _save_to_state_dict or get_extra_state, or the module
// has state_dict hooks), an entry is not a tensor, or a name repeats. The
// Python walk (_model_state._collect) is its twin for the torch backend and
// under torch.compile. On many_small (2,100 tensors) the Python walk and the
// detach took ~3 ms per model; the rules are the same. The tensors come
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
    if (!torch_internals::is_tensor(value)) return false;
    names_.append(name);
    seen_.add(name);
    at::Tensor scratch;
    held_.tensors.push_back(detached(torch_internals::unpack_tensor(value, scratch)));
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

py::object state_items(py::handle module, py::handle base_state_dict, py::handle base_save,
                       py::handle base_extra_state) {
  return StateWalk(base_state_dict, base_save, base_extra_state).run(module);
}

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

void bind_held_tensors(py::module_& m) {
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
  m.def("detach_all", &detach_all, "t.detach() for each tensor, without a dispatcher call per tensor");
  m.def("state_items", &state_items,
        "(names, detached tensors) of a module's state_dict, or None where state_dict() must run");
  m.def("flatten_dense", &flatten_dense, "torch.cat of every tensor flattened, without a view per tensor");
  m.def("views_like", [](const std::vector<at::Tensor>& buffers, const HeldTensors& like) {
    return views_like(buffers, like.tensors);
  });
  m.def("views_like", &views_like, "Views of flat per-dtype buffers shaped like each tensor of `like`");
}

}  // namespace layersel::python
