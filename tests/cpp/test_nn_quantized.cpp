// Converted integer modules (qext::nn::quantized) and qext::nn::convert: a trained C++ QAT model
// converted layer by layer agrees with its fake-quant model (1 output step per layer, same argmax),
// one converted Linear agrees with a scalar double-precision reference, LSQ weights convert to the
// levels of their learned scales, and bad input is refused naming the module without changing it.
// With QEXT_NN_EXPORT set, the Export test writes QAT states and the C++ converted modules
// (tests/python/test_cpp_modules.py converts the same states in Python and compares).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <string>

#include "nn_test_models.h"

namespace {

using qext::nn::convert;
using qext_test::ConvNet;
using qext_test::TinyNet;

// ConvNet (QuantStub -> ConvBnReLU2d -> QConv2d, QAdd residual) -> flatten -> QLinear: the whole
// C++ QAT vocabulary in one classifier.
struct ClassifierImpl : torch::nn::Module {
  explicit ClassifierImpl(const qext::nn::QConfig& q)
      : body(register_module("body", ConvNet(q))),
        fc(register_module(
            "fc", qext::nn::QLinear(qext::nn::QLinearOptions{8 * 6 * 6, 5, true, false, q}))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc->forward(body->forward(x).flatten(1)); }
  ConvNet body;
  qext::nn::QLinear fc;
};
TORCH_MODULE(Classifier);

// The converted layers of a Classifier, run in the same order.
struct Converted {
  explicit Converted(const Classifier& net)
      : quant(convert(net->body->quant, "body.quant")),
        cbr(convert(net->body->cbr, "body.cbr")),
        conv(convert(net->body->conv, "body.conv")),
        add(convert(net->body->add, "body.add")),
        fc(convert(net->fc, "fc")) {}
  torch::Tensor forward(const torch::Tensor& x) {
    const torch::Tensor h = cbr->forward(quant->forward(x));
    return fc->forward(add->forward(h, conv->forward(h)).flatten(1));
  }
  qext::nn::quantized::Quantize quant;
  qext::nn::quantized::Conv2d cbr, conv;
  qext::nn::quantized::QAdd add;
  qext::nn::quantized::Linear fc;
};

std::pair<torch::Tensor, torch::Tensor> task(int64_t n, uint64_t seed) {
  torch::manual_seed(seed);
  const auto x = torch::randn({n, 3, 6, 6});
  torch::manual_seed(99);  // the same labelling function for every batch
  const auto proj = torch::randn({3 * 6 * 6, 5});
  return {x, torch::matmul(x.flatten(1), proj).argmax(1)};
}

Classifier trained_classifier(const std::string& preset) {
  torch::manual_seed(5);
  Classifier net(qext::nn::get_qconfig(preset));
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.02).momentum(0.9));
  const auto [x, y] = task(128, 1);
  for (int step = 0; step < 40; ++step) {
    if (step == 30) net->body->cbr->freeze_bn_stats();
    opt.zero_grad();
    torch::nn::functional::cross_entropy(net->forward(x), y).backward();
    opt.step();
  }
  net->forward(x);  // the observers see the final weights (as convert's look at them would)
  for (const auto& fq : qext_test::fake_quantizers(*net)) fq->enable_observer(false);
  net->eval();
  return net;
}

// (q - z) * s exactly as the fake-quant ops compute it (torch's dequantize may fuse differently).
torch::Tensor deq(const torch::Tensor& q) {
  const torch::Tensor levels = q.int_repr();
  return qext::ops::dequantize(levels, torch::full({1}, q.q_scale(), torch::kFloat),
                               torch::full({1}, q.q_zero_point(), torch::kInt));
}

// |dequantize(q) - ref| in units of q's scale.
double max_steps(const torch::Tensor& q, const torch::Tensor& ref) {
  return ((deq(q) - ref).abs().max() / q.q_scale()).item<double>();
}

void expect_agreement(const std::string& preset) {
  Classifier net = trained_classifier(preset);
  Converted q(net);
  const torch::Tensor x = task(64, 2).first;
  const torch::NoGradGuard no_grad;

  // Layer by layer, each converted layer fed the same quantized input as its QAT layer.
  const torch::Tensor xq = q.quant->forward(x);
  ASSERT_TRUE(xq.is_quantized());
  EXPECT_TRUE(torch::equal(deq(xq), net->body->quant->forward(x)));
  const torch::Tensor h = q.cbr->forward(xq);
  EXPECT_LE(max_steps(h, net->body->cbr->forward(deq(xq))), 1.0 + 1e-6);
  const torch::Tensor c = q.conv->forward(h);
  EXPECT_LE(max_steps(c, net->body->conv->forward(deq(h))), 1.0 + 1e-6);
  const torch::Tensor a = q.add->forward(h, c);
  EXPECT_LE(max_steps(a, net->body->add->forward(deq(h), deq(c))), 1.0 + 1e-6);
  const torch::Tensor logits = q.fc->forward(a.flatten(1));
  EXPECT_LE(max_steps(logits, net->fc->forward(deq(a.flatten(1)))), 1.0 + 1e-6);

  // End to end against the fake-quant model in eval mode: the same class for every image, and
  // within one output step per logit.
  const torch::Tensor y_int = q.forward(x);
  const torch::Tensor y_qat = net->forward(x);
  EXPECT_TRUE(torch::equal(deq(y_int).argmax(1), y_qat.argmax(1)));
  EXPECT_LE(max_steps(y_int, y_qat), 1.0 + 1e-6);
  // The model learned its training set (the comparison is not between untrained outputs).
  const auto [x_train, y_train] = task(128, 1);
  EXPECT_GT(net->forward(x_train).argmax(1).eq(y_train).to(torch::kFloat).mean().item<double>(),
            0.6);

  // The int8 kernels against the modules' own float64 reference path: one step at most (ties).
  EXPECT_LE((q.conv->forward(h).int_repr().to(torch::kInt) -
             q.conv->reference_forward(h).int_repr().to(torch::kInt))
                .abs()
                .max()
                .item<int>(),
            1);
}

TEST(QuantizedModules, ConvertedClassifierAgreesWithQatInt8) { expect_agreement("int8"); }

TEST(QuantizedModules, ConvertedClassifierAgreesWithQatLsq) { expect_agreement("int4_lsq"); }

// Strided, padded, dilated, grouped and depthwise convolutions with and without ReLU, with 8-bit
// and float outputs: each converted layer against its QAT layer on the same quantized input.
TEST(QuantizedModules, ConvGeometriesAgreeWithQat) {
  struct Case {
    int64_t in, out, k, stride, padding, dilation, groups;
    bool relu, float_output;
  };
  const Case cases[] = {{4, 6, 3, 2, 1, 1, 1, true, false},
                        {4, 6, 3, 1, 2, 2, 2, false, false},
                        {6, 6, 3, 1, 1, 1, 6, true, false},
                        {6, 6, 3, 2, 1, 1, 6, false, true},
                        {4, 8, 1, 1, 0, 1, 2, false, true}};
  for (const Case& c : cases) {
    SCOPED_TRACE("in " + std::to_string(c.in) + " out " + std::to_string(c.out) + " groups " +
                 std::to_string(c.groups) + " stride " + std::to_string(c.stride) +
                 (c.float_output ? " float output" : ""));
    torch::manual_seed(10);
    qext::nn::QConfig qconfig = qext::nn::get_qconfig("int8");
    if (c.float_output) qconfig.activation.reset();
    qext::nn::QConv2d qat(qext::nn::QConv2dOptions{c.in, c.out, c.k, c.stride, c.padding,
                                                   c.dilation, c.groups, true, c.relu, qconfig});
    for (int i = 0; i < 3; ++i) qat->forward(torch::randn({2, c.in, 9, 9}));
    for (const auto& fq : qext_test::fake_quantizers(*qat)) fq->enable_observer(false);
    qat->eval();
    qext::nn::quantized::Conv2d q = convert(qat, "conv");
    const torch::Tensor xq =
        torch::quantize_per_tensor(torch::randn({2, c.in, 9, 9}), 0.04, 128, torch::kQUInt8);
    const torch::Tensor y = q->forward(xq);
    const torch::Tensor y_qat = qat->forward(deq(xq));
    ASSERT_EQ(y.sizes(), y_qat.sizes());
    if (c.float_output) {
      ASSERT_FALSE(y.is_quantized());
      // Float outputs carry the bias rounded to int32 accumulator units (half a unit at most).
      const double unit = 0.04 * q->weight_scale.max().item<double>();
      EXPECT_LE((y - y_qat).abs().max().item<double>(), 0.5 * unit + 1e-4);
      if (c.relu) EXPECT_GE(y.min().item<float>(), 0.0f);
    } else {
      ASSERT_TRUE(y.is_quantized());
      EXPECT_LE(max_steps(y, y_qat), 1.0 + 1e-6);
      EXPECT_LE((y.int_repr().to(torch::kInt) - q->reference_forward(xq).int_repr().to(torch::kInt))
                    .abs()
                    .max()
                    .item<int>(),
                1);
    }
  }
}

// One converted Linear against a scalar reference computed here in double: torch's own
// per-tensor quantization of the input, the weights quantized by hand with the module's
// per-channel scales, integer sums, bias, and requantization with round-half-to-even.
TEST(QuantizedModules, LinearMatchesScalarReference) {
  torch::manual_seed(7);
  qext::nn::QLinear fc(
      qext::nn::QLinearOptions{24, 10, true, false, qext::nn::get_qconfig("int8")});
  for (int i = 0; i < 3; ++i) fc->forward(torch::randn({16, 24}) * 2.0);  // observe outputs
  qext::nn::quantized::Linear q = convert(fc, "fc");

  // Weight scales: torch.ao's symmetric int8 formula max|w| / 127.5 per output channel.
  const torch::Tensor w = fc->weight.detach();
  const torch::Tensor expected_ws = std::get<0>(w.abs().max(1)) / 127.5f;
  EXPECT_TRUE(torch::allclose(q->weight_scale, expected_ws, 1e-6, 0.0));
  const auto ws = q->weight_scale.accessor<float, 1>();
  const auto wf = w.accessor<float, 2>();
  const auto wq = q->weight.accessor<int8_t, 2>();
  ASSERT_TRUE(q->packed_weight.defined());  // the int8 kernel path
  const auto row_sums = q->row_sums.accessor<int32_t, 1>();
  for (int64_t o = 0; o < 10; ++o) {
    int64_t sum = 0;
    for (int64_t k = 0; k < 24; ++k) {
      // The numerics contract: nearbyint(w * (1 / s)) in float32, clamped.
      const double level = std::nearbyint(wf[o][k] * (1.0f / ws[o]));
      EXPECT_EQ(wq[o][k], static_cast<int8_t>(std::min(127.0, std::max(-128.0, level))));
      sum += wq[o][k];
    }
    EXPECT_EQ(row_sums[o], sum);
  }

  const double s_x = 0.03;
  const int64_t z_x = 120;
  const torch::Tensor x = torch::randn({32, 24}) * 1.5;
  const torch::Tensor xq = torch::quantize_per_tensor(x, s_x, z_x, torch::kQUInt8);
  const torch::Tensor y = q->forward(xq);
  ASSERT_TRUE(y.is_quantized());
  const double s_out = q->scale.item<float>();
  const int64_t z_out = q->zero_point.item<int32_t>();
  EXPECT_DOUBLE_EQ(y.q_scale(), s_out);
  EXPECT_EQ(y.q_zero_point(), z_out);
  const torch::Tensor x_levels = xq.int_repr(), y_levels = y.int_repr();
  const torch::Tensor bias = fc->bias.detach();
  const auto xl = x_levels.accessor<uint8_t, 2>();
  const auto b = bias.accessor<float, 1>();
  const auto yl = y_levels.accessor<uint8_t, 2>();
  int64_t exact = 0;
  for (int64_t n = 0; n < 32; ++n) {
    for (int64_t o = 0; o < 10; ++o) {
      int64_t acc = 0;
      for (int64_t k = 0; k < 24; ++k) acc += (xl[n][k] - z_x) * int64_t{wq[o][k]};
      const double real = static_cast<double>(acc) * s_x * ws[o] + b[o];
      const double level =
          std::min(255.0, std::max(0.0, std::nearbyint(real / s_out) + static_cast<double>(z_out)));
      const int64_t got = yl[n][o];
      EXPECT_LE(std::abs(got - static_cast<int64_t>(level)), 1) << "n " << n << " o " << o;
      exact += got == static_cast<int64_t>(level);
    }
  }
  EXPECT_GE(exact, 32 * 10 - 3);  // off by one only where real / s_out lies at a .5 tie
}

// LSQ weights become the integer levels of their learned scales; the learned zero point of the
// LSQ+ output rounds to the output zero point.
TEST(QuantizedModules, LsqLinearConvertsToItsLearnedLevels) {
  torch::manual_seed(8);
  TinyNet net(qext::nn::get_qconfig("int4_lsq"));
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05));
  const auto x = torch::randn({64, 16});
  for (int step = 0; step < 5; ++step) {
    opt.zero_grad();
    net->forward(x).pow(2).mean().backward();
    opt.step();
  }
  qext::nn::quantized::Linear q = convert(net->fc1, "fc1");
  const torch::Tensor s = net->fc1->weight_fake_quant->scale.detach();
  // torch's own per-channel quantization as the reference, clamped to int4.
  const torch::Tensor levels =
      torch::quantize_per_channel(net->fc1->weight.detach(), s.to(torch::kDouble),
                                  torch::zeros({32}, torch::kLong), 0, torch::kQInt8)
          .int_repr()
          .clamp(-8, 7)
          .to(torch::kFloat);
  EXPECT_TRUE(torch::equal(q->weight.to(torch::kFloat), levels));
  EXPECT_TRUE(torch::equal(q->weight_scale, s));
  EXPECT_EQ(q->out_quant_min, 0);
  EXPECT_EQ(q->out_quant_max, 15);
  const double zp = net->fc1->activation_post_process->zero_point.item<float>();
  EXPECT_EQ(q->zero_point.item<int32_t>(),
            static_cast<int32_t>(std::nearbyint(std::clamp(zp, 0.0, 15.0))));
}

// c10::ValueError naming the module; the QAT module keeps its state.
TEST(QuantizedModules, BadInputIsRefusedNamingTheModule) {
  auto state_of = [](const torch::nn::Module& m) {
    c10::Dict<std::string, torch::Tensor> d;
    qext_test::add_state(d, m, "");
    return d;
  };
  auto same_state = [](const c10::Dict<std::string, torch::Tensor>& a,
                       const c10::Dict<std::string, torch::Tensor>& b) {
    if (a.size() != b.size()) return false;
    for (const auto& item : a) {
      if (!b.contains(item.key()) || !torch::equal(item.value(), b.at(item.key()))) return false;
    }
    return true;
  };
  auto expect_error = [](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no error; expected one mentioning " << needle;
    } catch (const c10::ValueError& e) {
      EXPECT_NE(std::string(e.what_without_backtrace()).find(needle), std::string::npos)
          << e.what_without_backtrace();
    }
  };

  torch::manual_seed(9);
  // Never run: the weight observer looks at the weights during convert, the output one is empty.
  qext::nn::QLinear fresh(
      qext::nn::QLinearOptions{8, 4, true, false, qext::nn::get_qconfig("int8")});
  const auto before = state_of(*fresh);
  expect_error([&] { convert(fresh, "head.fc"); },
               "output quantizer of QLinear 'head.fc' saw no data");
  EXPECT_TRUE(same_state(before, state_of(*fresh)));

  // Weight observer switched off before it saw anything: float weights without statistics.
  fresh->weight_fake_quant->enable_observer(false);
  fresh->forward(torch::randn({2, 8}));  // the output observer fills; the weight one does not
  expect_error([&] { convert(fresh, "head.fc"); },
               "weight quantizer of QLinear 'head.fc': FakeQuantize: no finite values observed in "
               "channel 0");

  // An LSQ quantizer never initialised (observer off).
  qext::nn::QConv2d lsq(qext::nn::QConv2dOptions{3, 4, 3, 1, 1, 1, 1, true, false,
                                                 qext::nn::get_qconfig("int4_lsq")});
  lsq->weight_fake_quant->enable_observer(false);
  lsq->activation_post_process->enable_observer(false);
  lsq->forward(torch::randn({1, 3, 5, 5}));
  const auto lsq_before = state_of(*lsq);
  expect_error([&] { convert(lsq, "stem"); }, "QConv2d 'stem'");
  EXPECT_TRUE(same_state(lsq_before, state_of(*lsq)));

  // Per-channel output quantization has no converted form.
  qext::nn::QConfig per_channel_out = qext::nn::get_qconfig("int8");
  per_channel_out.activation->axis = 1;
  qext::nn::QAdd add(per_channel_out);
  add->forward(torch::randn({2, 3}), torch::randn({2, 3}));
  expect_error([&] { convert(add, "res"); },
               "QAdd 'res' quantizes its output per channel (axis 1)");

  // A successful convert leaves the QAT module as it was, although its weight observer looked at
  // the weights once more.
  qext::nn::QLinear used(
      qext::nn::QLinearOptions{8, 4, true, false, qext::nn::get_qconfig("int8")});
  used->forward(torch::randn({2, 8}));
  const auto used_before = state_of(*used);
  convert(used, "fc");
  EXPECT_TRUE(same_state(used_before, state_of(*used)));
}

// Writes, per preset, the QAT ConvNet's state after two training forwards ("qat.<key>"), the
// converted modules' buffers ("q.<module>.<key>"), an input "x" and the integer output's levels,
// scale and zero point.
TEST(QuantizedModules, Export) {
  const char* dir = std::getenv("QEXT_NN_EXPORT");
  if (dir == nullptr) GTEST_SKIP() << "QEXT_NN_EXPORT not set";
  for (const std::string preset : {"int8", "int4_lsq"}) {
    torch::manual_seed(6);
    ConvNet net(qext::nn::get_qconfig(preset));
    net->forward(torch::randn({4, 3, 6, 6}));
    net->forward(torch::randn({4, 3, 6, 6}) * 1.5);
    c10::Dict<std::string, torch::Tensor> out;
    qext_test::add_state(out, *net, "qat.");
    const torch::NoGradGuard no_grad;
    auto quant = convert(net->quant, "quant");
    auto cbr = convert(net->cbr, "cbr");
    auto conv = convert(net->conv, "conv");
    auto add = convert(net->add, "add");
    qext_test::add_state(out, *quant, "q.quant.");
    qext_test::add_state(out, *cbr, "q.cbr.");
    qext_test::add_state(out, *conv, "q.conv.");
    qext_test::add_state(out, *add, "q.add.");
    const torch::Tensor x = torch::randn({4, 3, 6, 6});
    const torch::Tensor h = cbr->forward(quant->forward(x));
    const torch::Tensor y = add->forward(h, conv->forward(h));
    out.insert("x", x);
    out.insert("y_levels", y.int_repr());
    out.insert("y_scale", torch::full({1}, y.q_scale(), torch::kDouble));
    out.insert("y_zero_point", torch::full({1}, y.q_zero_point(), torch::kLong));
    qext_test::save_dict(out, std::string(dir) + "/converted_" + preset + ".pt");
  }
}

}  // namespace
