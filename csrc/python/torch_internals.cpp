// torch_internals.h's functions: torch's internal helpers where their headers
// are where this torch release keeps them, else the public fallbacks.
#include "python/torch_internals.h"

#include <stdexcept>
#include <string>
#include <utility>

#if defined(LAYERSEL_TORCH_PUBLIC_ONLY)
#define LAYERSEL_HAS_PYTHON_VARIABLE 0
#define LAYERSEL_HAS_PYBIND_UTILS 0
#define LAYERSEL_HAS_TENSOR_NUMPY 0
#define LAYERSEL_HAS_TH_ERRORS 0
#else
#define LAYERSEL_HAS_PYTHON_VARIABLE __has_include(<torch/csrc/autograd/python_variable.h>)
#define LAYERSEL_HAS_PYBIND_UTILS __has_include(<torch/csrc/jit/python/pybind_utils.h>)
#define LAYERSEL_HAS_TENSOR_NUMPY __has_include(<torch/csrc/utils/tensor_numpy.h>)
#define LAYERSEL_HAS_TH_ERRORS __has_include(<torch/csrc/Exceptions.h>)
#endif

#if LAYERSEL_HAS_PYTHON_VARIABLE
#include <torch/csrc/autograd/python_variable.h>
#endif
#if LAYERSEL_HAS_PYBIND_UTILS
#include <torch/csrc/jit/python/pybind_utils.h>
#else
#include <ATen/core/jit_type.h>
#endif
#if LAYERSEL_HAS_TENSOR_NUMPY
#include <torch/csrc/utils/tensor_numpy.h>
#endif
#if LAYERSEL_HAS_TH_ERRORS
#include <torch/csrc/Exceptions.h>
#endif

namespace layersel::torch_internals {

#if LAYERSEL_HAS_PYTHON_VARIABLE
bool is_tensor(PyObject* obj) { return THPVariable_Check(obj); }

const at::Tensor& unpack_tensor(PyObject* obj, at::Tensor& /*scratch*/) { return THPVariable_Unpack(obj); }
#else
bool is_tensor(PyObject* obj) {
  static PyObject* const tensor_type = py::object(py::module_::import("torch").attr("Tensor")).release().ptr();
  const int r = PyObject_IsInstance(obj, tensor_type);
  if (r < 0) throw py::error_already_set();
  return r != 0;
}

const at::Tensor& unpack_tensor(PyObject* obj, at::Tensor& scratch) {
  scratch = py::handle(obj).cast<at::Tensor>();
  return scratch;
}
#endif

#if LAYERSEL_HAS_PYBIND_UTILS
c10::IValue to_ivalue(const c10::FunctionSchema& schema, size_t index, py::handle obj) {
  return torch::jit::argumentToIValue(schema, index, obj);
}

py::object stack_to_python(std::vector<c10::IValue>&& stack) {
  return torch::jit::createPyObjectForStack(std::move(stack));
}
#else
namespace {

// The argument types of the layersel ops' schemas (csrc/ops.cpp) and their
// lists and optionals; any other is refused (a cast error, reported as a
// mismatch naming the argument).
c10::IValue convert(py::handle obj, const c10::Type& type) {
  switch (type.kind()) {
    case c10::TypeKind::TensorType: return obj.cast<at::Tensor>();
    case c10::TypeKind::IntType: return obj.cast<int64_t>();
    case c10::TypeKind::FloatType: return obj.cast<double>();
    case c10::TypeKind::BoolType: return obj.cast<bool>();
    case c10::TypeKind::StringType: return obj.cast<std::string>();
    case c10::TypeKind::ScalarTypeType: return obj.cast<at::ScalarType>();
    case c10::TypeKind::OptionalType:
      return obj.is_none() ? c10::IValue() : convert(obj, *type.castRaw<c10::OptionalType>()->getElementType());
    case c10::TypeKind::ListType: {
      const c10::Type& element = *type.castRaw<c10::ListType>()->getElementType();
      switch (element.kind()) {
        case c10::TypeKind::TensorType: return c10::List<at::Tensor>(obj.cast<std::vector<at::Tensor>>());
        case c10::TypeKind::IntType: return c10::List<int64_t>(obj.cast<std::vector<int64_t>>());
        case c10::TypeKind::FloatType: return c10::List<double>(obj.cast<std::vector<double>>());
        case c10::TypeKind::BoolType: {  // no c10::List<bool> from std::vector<bool> (a bitfield)
          c10::List<bool> out;
          for (const bool b : obj.cast<std::vector<bool>>()) out.push_back(b);
          return out;
        }
        default: break;
      }
      break;
    }
    default: break;
  }
  throw py::cast_error("layersel: no conversion to " + type.str());
}

py::object to_python(const c10::IValue& value) {
  if (value.isNone()) return py::none();
  if (value.isTensor()) return py::cast(value.toTensor());
  if (value.isBool()) return py::bool_(value.toBool());
  if (value.isInt()) return py::int_(value.toInt());
  if (value.isDouble()) return py::float_(value.toDouble());
  if (value.isString()) return py::str(value.toStringRef());
  if (value.isList()) {
    py::list out;
    for (const c10::IValue& element : value.toListRef()) out.append(to_python(element));
    return out;
  }
  if (value.isTuple()) {
    const auto& elements = value.toTupleRef().elements();
    py::tuple out(elements.size());
    for (size_t i = 0; i < elements.size(); ++i) out[i] = to_python(elements[i]);
    return out;
  }
  throw std::runtime_error("layersel: no Python value for an op output of type " + value.tagKind());
}

}  // namespace

c10::IValue to_ivalue(const c10::FunctionSchema& schema, size_t index, py::handle obj) {
  const c10::Argument& argument = schema.arguments().at(index);
  try {
    return convert(obj, *argument.real_type());
  } catch (const py::cast_error&) {
  } catch (const py::error_already_set&) {
  }
  throw std::runtime_error(
      schema.formatTypeMismatchMsg(argument, Py_TYPE(obj.ptr())->tp_name, index, py::repr(obj).cast<std::string>()));
}

py::object stack_to_python(std::vector<c10::IValue>&& stack) {
  if (stack.empty()) return py::none();
  if (stack.size() == 1) return to_python(stack[0]);
  py::tuple out(stack.size());
  for (size_t i = 0; i < stack.size(); ++i) out[i] = to_python(stack[i]);
  return out;
}
#endif

#if LAYERSEL_HAS_TENSOR_NUMPY
PyObject* tensor_to_numpy(const at::Tensor& t) { return torch::utils::tensor_to_numpy(t); }
#else
PyObject* tensor_to_numpy(const at::Tensor& t) {
  try {
    return py::cast(t).attr("numpy")().release().ptr();
  } catch (py::error_already_set& e) {
    e.restore();
    return nullptr;
  }
}
#endif

#if LAYERSEL_HAS_TH_ERRORS
py::object translating_errors(const std::function<py::object()>& body) {
  HANDLE_TH_ERRORS
  return body();
  END_HANDLE_TH_ERRORS_PYBIND
}
#else
py::object translating_errors(const std::function<py::object()>& body) {
  try {
    return body();
  } catch (const py::error_already_set&) {
    throw;
  } catch (const py::builtin_exception&) {
    throw;
  } catch (const c10::TypeError& e) {
    throw py::type_error(e.what_without_backtrace());
  } catch (const c10::ValueError& e) {
    throw py::value_error(e.what_without_backtrace());
  } catch (const c10::IndexError& e) {
    throw py::index_error(e.what_without_backtrace());
  } catch (const c10::NotImplementedError& e) {
    PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
    throw py::error_already_set();
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}
#endif

}  // namespace layersel::torch_internals
