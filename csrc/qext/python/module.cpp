// qext._C: what Python needs that is not a torch operator. Importing it loads libqext, whose
// static initialisers register the torch.ops.qext operators.
#include <pybind11/pybind11.h>

#include "qext/kernels/fake_quantize_avx2.h"
#include "qext/qext.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "qext native module";
  m.def("version", &qext::version, "Version of libqext.");
  m.def("with_cuda", &qext::with_cuda, "Whether libqext was built with CUDA kernels.");
  m.def("cpu_has_avx2", &qext::kernels::cpu_has_avx2,
        "Whether the float32 CPU kernels use their AVX2 path on this machine.");
}
