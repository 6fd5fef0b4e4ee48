// _C.call_op: torch.ops.layersel.<name>(*args) with HeldTensors passed as the
// Tensor[] they hold (no Python tensor per element).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>

#include <string>
#include <utility>
#include <vector>

#include "python/bindings.h"

namespace layersel::python {
namespace {

// Each argument other than HeldTensors converted by the schema as torch.ops
// converts it (its error names the argument), trailing ones left out take the
// schema's defaults. Like torch.ops it releases the GIL while the op runs and
// raises the op's errors as their Python types (ValueError, TypeError...); the
// dispatcher does the rest as for any call. What it skips is
// __torch_function__ (ops._call goes through torch.ops when a mode or an
// overriding tensor wants it).
py::object call_op(const std::string& name, const py::args& args) {
  return torch_internals::translating_errors([&]() -> py::object {
    const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow(("layersel::" + name).c_str(), "");
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
        stack.push_back(torch_internals::to_ivalue(schema, i, args[i]));
      }
    }
    {
      py::gil_scoped_release no_gil;
      op.callBoxed(&stack);
    }
    return torch_internals::stack_to_python(std::move(stack));
  });
}

}  // namespace

void bind_call_op(py::module_& m) {
  m.def("call_op", &call_op, "torch.ops.layersel.<name>(*args), HeldTensors passed as their Tensor[]");
}

}  // namespace layersel::python
