// C++ QAT modules: a tiny model trains (loss decreases), the quantizers hold the scales the ops
// derive from the same tensors, and bad configurations are refused. With QEXT_NN_EXPORT set, the
// Export test writes a model's state before and after one forward (tests/python/test_cpp_modules.py
// replays it with the Python modules and compares).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>

#include "qext/nn/modules.h"
#include "qext/qext.h"

namespace {

using qext::nn::QLinear;
using qext::nn::QLinearOptions;

struct TinyNetImpl : torch::nn::Module {
  explicit TinyNetImpl(const qext::nn::QConfig& qconfig)
      : fc1(register_module("fc1", QLinear(QLinearOptions{16, 32, true, /*relu=*/true, qconfig}))),
        fc2(register_module("fc2", QLinear(QLinearOptions{32, 4, true, false, qconfig}))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2->forward(fc1->forward(x)); }
  QLinear fc1, fc2;
};
TORCH_MODULE(TinyNet);

TEST(QatModules, TinyModelTrains) {
  torch::manual_seed(0);
  const auto x = torch::randn({256, 16});
  const auto target = torch::matmul(x, torch::randn({16, 4})).argmax(1);
  TinyNet net(qext::nn::get_qconfig("int8"));
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  std::vector<double> losses;
  for (int step = 0; step < 60; ++step) {
    opt.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(net->forward(x), target);
    loss.backward();
    opt.step();
    losses.push_back(loss.item<double>());
  }
  EXPECT_LT(losses.back(), 0.5 * losses.front())
      << "first " << losses.front() << " last " << losses.back();

  // After a forward, each quantizer holds choose_qparams of its running range, and the weight
  // observer's running min/max (MinMax: over every step) cover the current weights.
  net->forward(x);
  const auto& wfq = net->fc1->weight_fake_quant;
  const auto [wmin, wmax] = qext::ops::aminmax(net->fc1->weight.detach(), 0);
  EXPECT_TRUE(torch::all(wfq->observer->min_val <= wmin).item<bool>());
  EXPECT_TRUE(torch::all(wfq->observer->max_val >= wmax).item<bool>());
  const auto [wscale, wzp] =
      qext::ops::choose_qparams(wfq->observer->min_val, wfq->observer->max_val, -128, 127, true);
  EXPECT_TRUE(torch::equal(wfq->scale, wscale));
  EXPECT_TRUE(torch::equal(wfq->zero_point, wzp));
  const auto& act = net->fc2->activation_post_process;
  const auto [ascale, azp] =
      qext::ops::choose_qparams(act->observer->min_val, act->observer->max_val, 0, 255, false);
  EXPECT_TRUE(torch::equal(act->scale, ascale));
  EXPECT_TRUE(torch::equal(act->zero_point, azp));
}

TEST(QatModules, QConv2dFakeQuantizesWeightsPerChannel) {
  torch::manual_seed(1);
  qext::nn::QConv2d conv(
      qext::nn::QConv2dOptions{3, 8, 3, 1, 1, 1, 1, true, true, qext::nn::get_qconfig("int8")});
  const auto y = conv->forward(torch::randn({2, 3, 8, 8}));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 8, 8, 8}));
  EXPECT_EQ(conv->weight_fake_quant->scale.numel(), 8);
  EXPECT_GE(y.min().item<float>(), 0.0f);  // fused ReLU before the output quantizer
}

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

TEST(QatModules, ConvBnFoldsIntoTheFrozenConv) {
  torch::manual_seed(3);
  ConvNet net(qext::nn::get_qconfig("int8"));
  const auto x = torch::randn({4, 3, 6, 6});
  for (int i = 0; i < 3; ++i) net->forward(x);  // BN statistics move away from their init
  net->cbr->freeze_bn_stats();
  // Observers off too (they also observe in eval), so both forwards use the same quantizers.
  net->cbr->weight_fake_quant->enable_observer(false);
  net->cbr->activation_post_process->enable_observer(false);
  const auto running_mean = net->cbr->bn->running_mean.clone();
  const auto frozen_train = net->cbr->forward(x);
  EXPECT_TRUE(torch::equal(net->cbr->bn->running_mean, running_mean));
  net->eval();
  EXPECT_TRUE(torch::allclose(net->cbr->forward(x), frozen_train));
  EXPECT_EQ(net->cbr->step.item<int64_t>(), 4);  // training forwards only
}

TEST(QatModules, BadConfigurationIsRefused) {
  qext::nn::QuantSpec spec;
  spec.bits = 17;
  EXPECT_THROW(qext::nn::FakeQuantize{spec}, c10::ValueError);
  EXPECT_THROW(qext::nn::get_qconfig("int3"), c10::ValueError);
  EXPECT_THROW((qext::nn::QConv2d(qext::nn::QConv2dOptions{3, 8, 3, 1, 0, 1, 2})), c10::ValueError);
}

// Writes {"x", "y", "before.<key>", "after.<key>"} for a fresh module and two training forwards
// (of x, then of 1.5 x: the second one updates EMA and batch-norm statistics).
void export_two_forwards(torch::nn::Module& net,
                         const std::function<torch::Tensor(const torch::Tensor&)>& forward,
                         const torch::Tensor& x, const std::string& path) {
  c10::Dict<std::string, torch::Tensor> out;
  out.insert("x", x);
  for (const auto& item : net.named_parameters()) {
    out.insert("before." + item.key(), item.value().detach().clone());
  }
  for (const auto& item : net.named_buffers())
    out.insert("before." + item.key(), item.value().clone());
  forward(x);
  out.insert("y", forward(x * 1.5).detach());
  for (const auto& item : net.named_buffers())
    out.insert("after." + item.key(), item.value().clone());
  const std::vector<char> bytes = torch::pickle_save(out);
  std::ofstream(path, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

TEST(QatModules, Export) {
  const char* dir = std::getenv("QEXT_NN_EXPORT");
  if (dir == nullptr) GTEST_SKIP() << "QEXT_NN_EXPORT not set";
  torch::manual_seed(2);
  TinyNet tiny(qext::nn::get_qconfig("int8"));
  export_two_forwards(
      *tiny, [&](const torch::Tensor& t) { return tiny->forward(t); }, torch::randn({32, 16}),
      std::string(dir) + "/tiny_net.pt");
  ConvNet conv(qext::nn::get_qconfig("int8"));
  export_two_forwards(
      *conv, [&](const torch::Tensor& t) { return conv->forward(t); }, torch::randn({4, 3, 6, 6}),
      std::string(dir) + "/conv_net.pt");
}

}  // namespace
