// C++ modules of qext for LibTorch programs: the QAT modules (qext::nn), the converted integer
// modules (qext::nn::quantized) and qext::nn::convert. Include this and link Qext::qext; the
// operators alone are in qext/qext.h (which stays free of the heavier torch::nn headers).
#pragma once

#include "qext/nn/modules.h"
#include "qext/nn/qconfig.h"
#include "qext/nn/quantized.h"
#include "qext/qext.h"
