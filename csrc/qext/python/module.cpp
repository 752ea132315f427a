// qext._C: what Python needs that is not a torch operator. Importing it loads libqext, whose
// static initialisers register the torch.ops.qext operators.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "qext/kernels/fake_quantize_avx2.h"
#include "qext/ops/quantized_layers.h"
#include "qext/qext.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "qext native module";
  m.def("version", &qext::version, "Version of libqext.");
  m.def("with_cuda", &qext::with_cuda, "Whether libqext was built with CUDA kernels.");
  m.def("cpu_has_avx2", &qext::kernels::cpu_has_avx2,
        "Whether the float32 CPU kernels use their AVX2 path on this machine.");
  m.def("set_int8_isa", &qext::ops::set_int8_isa, pybind11::arg("name"),
        "Forces the CPU integer kernels onto one ISA ('scalar', 'avx2', 'avx512_vnni', 'amx') or "
        "back to 'auto'.");
  m.def("int8_isa", &qext::ops::int8_isa, "The ISA forced by set_int8_isa, or 'auto'.");
  m.def("supported_int8_isas", &qext::ops::supported_int8_isas,
        "The ISAs of the CPU integer kernels that this machine runs.");
  m.def("derived_weight_entries", &qext::ops::derived_weight_entries,
        "How many weight layouts derived from packed weights the CPU convolution holds (tests).");
}
