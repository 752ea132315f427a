// C++ QAT modules: a tiny model trains (loss decreases; with int8 and with LSQ int4), the
// quantizers hold the scales the ops derive from the same tensors, the LSQ scales start where
// LSQ's formula puts them and learn, and bad configurations are refused. With QEXT_NN_EXPORT set,
// the Export test writes models' state before and after two forwards
// (tests/python/test_cpp_modules.py replays them with the Python modules and compares).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <string>

#include "nn_test_models.h"

namespace {

using qext_test::ConvNet;
using qext_test::TinyNet;

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

// LSQ (int4_lsq): the quantizers initialise from the first batch as LSQ / LSQ+ prescribe
// (checked against the formulas computed here), the model trains, and the scales get gradients
// and move.
TEST(QatModules, LsqTinyModelTrains) {
  torch::manual_seed(4);
  const auto x = torch::randn({256, 16});
  const auto target = torch::matmul(x, torch::randn({16, 4})).argmax(1);
  TinyNet net(qext::nn::get_qconfig("int4_lsq"));
  const auto& wfq = net->fc1->weight_fake_quant;
  const auto& afq = net->fc1->activation_post_process;
  EXPECT_EQ(wfq->scale.numel(), 1);  // sized by the first batch
  EXPECT_TRUE(wfq->scale.requires_grad());
  EXPECT_FALSE(wfq->zero_point.requires_grad());  // symmetric: fixed zero point
  EXPECT_TRUE(afq->zero_point.requires_grad());   // LSQ+: learned zero point
  EXPECT_FALSE(wfq->has_data());
  // The optimizer is built before the first forward: it must train the resized parameters.
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));

  const torch::Tensor w0 = net->fc1->weight.detach().clone();
  net->forward(x);
  // Weight: per output channel 2 mean|w| / sqrt(7), in double here.
  const auto w_acc = w0.accessor<float, 2>();
  ASSERT_EQ(wfq->scale.numel(), 32);
  for (int64_t c = 0; c < 32; ++c) {
    double sum = 0.0;
    for (int64_t k = 0; k < 16; ++k) sum += std::abs(static_cast<double>(w_acc[c][k]));
    const double expected = 2.0 * (sum / 16.0) / std::sqrt(7.0);
    EXPECT_NEAR(wfq->scale[c].item<double>(), expected, 1e-6 * expected) << "channel " << c;
  }
  EXPECT_TRUE(torch::equal(wfq->zero_point, torch::zeros({32})));
  // Activation (after ReLU, uint4 affine): scale = (max - min) / 15 over the first batch, min
  // clamped to 0, zero point 0; the batch was computed with the int4 weights (torch's own fake
  // quantization as the reference).
  const torch::Tensor w_fq = torch::fake_quantize_per_channel_affine(
      w0, wfq->scale.detach(), torch::zeros({32}, torch::kInt), 0, -8, 7);
  const torch::Tensor h = torch::relu(torch::linear(x, w_fq, net->fc1->bias.detach()));
  const double hmax = h.max().item<double>();
  EXPECT_NEAR(afq->scale.item<double>(), hmax / 15.0, 1e-6 * hmax);
  EXPECT_EQ(afq->zero_point.item<float>(), 0.0f);
  EXPECT_EQ(afq->initialized.item<uint8_t>(), 1);

  const torch::Tensor scale0 = wfq->scale.detach().clone();
  std::vector<double> losses;
  for (int step = 0; step < 80; ++step) {
    opt.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(net->forward(x), target);
    loss.backward();
    if (step == 0) {
      ASSERT_TRUE(wfq->scale.grad().defined());
      EXPECT_GT(wfq->scale.grad().abs().sum().item<double>(), 0.0);
      ASSERT_TRUE(afq->zero_point.grad().defined());
    }
    opt.step();
    losses.push_back(loss.item<double>());
  }
  EXPECT_LT(losses.back(), 0.6 * losses.front())
      << "first " << losses.front() << " last " << losses.back();
  EXPECT_GT((wfq->scale.detach() - scale0).abs().max().item<double>(), 1e-4);
  // The integer model's parameters: max(scale, eps) and the rounded zero point.
  const auto [s, z] = wfq->calculate_qparams();
  EXPECT_TRUE(torch::equal(s, wfq->scale.detach().clamp_min(1.1920928955078125e-07)));
  EXPECT_EQ(z.scalar_type(), torch::kInt);
}

TEST(QatModules, BadConfigurationIsRefused) {
  qext::nn::QuantSpec spec;
  spec.bits = 17;
  EXPECT_THROW(qext::nn::FakeQuantize{spec}, c10::ValueError);
  EXPECT_THROW(qext::nn::get_qconfig("int3"), c10::ValueError);
  EXPECT_THROW((qext::nn::QConv2d(qext::nn::QConv2dOptions{3, 8, 3, 1, 0, 1, 2})), c10::ValueError);
}

// Writes {"x", "y", "before.<key>", "after.<key>"} (parameters and buffers) for a fresh module
// and two training forwards (of x, then of 1.5 x: the second one updates EMA and batch-norm
// statistics; LSQ quantizers initialise on the first).
void export_two_forwards(torch::nn::Module& net,
                         const std::function<torch::Tensor(const torch::Tensor&)>& forward,
                         const torch::Tensor& x, const std::string& path) {
  c10::Dict<std::string, torch::Tensor> out;
  out.insert("x", x);
  qext_test::add_state(out, net, "before.");
  forward(x);
  out.insert("y", forward(x * 1.5).detach());
  qext_test::add_state(out, net, "after.");
  qext_test::save_dict(out, path);
}

TEST(QatModules, Export) {
  const char* dir = std::getenv("QEXT_NN_EXPORT");
  if (dir == nullptr) GTEST_SKIP() << "QEXT_NN_EXPORT not set";
  for (const std::string preset : {"int8", "int4_lsq"}) {
    const std::string suffix = preset == "int8" ? "" : "_lsq";
    torch::manual_seed(2);
    TinyNet tiny(qext::nn::get_qconfig(preset));
    export_two_forwards(
        *tiny, [&](const torch::Tensor& t) { return tiny->forward(t); }, torch::randn({32, 16}),
        std::string(dir) + "/tiny_net" + suffix + ".pt");
    ConvNet conv(qext::nn::get_qconfig(preset));
    export_two_forwards(
        *conv, [&](const torch::Tensor& t) { return conv->forward(t); }, torch::randn({4, 3, 6, 6}),
        std::string(dir) + "/conv_net" + suffix + ".pt");
  }
}

}  // namespace
