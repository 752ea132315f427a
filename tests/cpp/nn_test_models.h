// Small QAT models and export helpers shared by the C++ module tests (test_nn_modules.cpp,
// test_nn_quantized.cpp); tests/python/test_cpp_modules.py builds the same models in Python.
#pragma once

#include <torch/torch.h>

#include <fstream>
#include <string>
#include <vector>

#include "qext/nn.h"

namespace qext_test {

using qext::nn::QLinear;
using qext::nn::QLinearOptions;

// fc1 (LinearReLU 16 -> 32) -> fc2 (QLinear 32 -> 4).
struct TinyNetImpl : torch::nn::Module {
  explicit TinyNetImpl(const qext::nn::QConfig& qconfig)
      : fc1(register_module("fc1", QLinear(QLinearOptions{16, 32, true, /*relu=*/true, qconfig}))),
        fc2(register_module("fc2", QLinear(QLinearOptions{32, 4, true, false, qconfig}))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2->forward(fc1->forward(x)); }
  QLinear fc1, fc2;
};
TORCH_MODULE(TinyNet);

// QuantStub -> ConvBnReLU2d -> QConv2d, plus a QAdd residual.
struct ConvNetImpl : torch::nn::Module {
  explicit ConvNetImpl(const qext::nn::QConfig& q)
      : quant(register_module("quant", qext::nn::QuantStub(q))),
        cbr(register_module(
            "cbr", qext::nn::ConvBn2d(qext::nn::ConvBn2dOptions{
                       qext::nn::QConv2dOptions{3, 8, 3, 1, 1, 1, 1, false, /*relu=*/true, q}}))),
        conv(register_module("conv", qext::nn::QConv2d(qext::nn::QConv2dOptions{8, 8, 3, 1, 1, 1, 1,
                                                                                true, false, q}))),
        add(register_module("add", qext::nn::QAdd(q))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    const torch::Tensor h = cbr->forward(quant->forward(x));
    return add->forward(h, conv->forward(h));
  }
  qext::nn::QuantStub quant;
  qext::nn::ConvBn2d cbr;
  qext::nn::QConv2d conv;
  qext::nn::QAdd add;
};
TORCH_MODULE(ConvNet);

// Adds the module's parameters and buffers (detached copies) under "<prefix><name>".
inline void add_state(c10::Dict<std::string, torch::Tensor>& out, const torch::nn::Module& m,
                      const std::string& prefix) {
  for (const auto& item : m.named_parameters()) {
    out.insert(prefix + item.key(), item.value().detach().clone());
  }
  for (const auto& item : m.named_buffers()) out.insert(prefix + item.key(), item.value().clone());
}

inline void save_dict(const c10::Dict<std::string, torch::Tensor>& dict, const std::string& path) {
  const std::vector<char> bytes = torch::pickle_save(dict);
  std::ofstream(path, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Every qext::nn::FakeQuantize in m (for switching observers off in tests).
inline std::vector<std::shared_ptr<qext::nn::FakeQuantizeImpl>> fake_quantizers(
    torch::nn::Module& m) {
  std::vector<std::shared_ptr<qext::nn::FakeQuantizeImpl>> out;
  for (const auto& child : m.modules()) {
    if (auto fq = std::dynamic_pointer_cast<qext::nn::FakeQuantizeImpl>(child)) out.push_back(fq);
  }
  return out;
}

}  // namespace qext_test
