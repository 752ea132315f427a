// The C++ API (qext::ops) against torch's own fake-quantization ops, including autograd from C++.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "qext/qext.h"

namespace {

torch::Tensor int_tensor(std::vector<int32_t> values) {
  return torch::tensor(values, torch::dtype(torch::kInt));
}

TEST(FakeQuantizeOp, PerTensorMatchesTorchBitForBit) {
  torch::manual_seed(0);
  const auto x = torch::randn({4, 3, 17, 5}) * 3;
  for (auto [lo, hi] :
       {std::pair{-128, 127}, std::pair{0, 255}, std::pair{-8, 7}, std::pair{0, 3}}) {
    const auto y = qext::ops::fake_quantize(x, 0.037, lo + 1, lo, hi);
    const auto ref = torch::fake_quantize_per_tensor_affine(x, 0.037, lo + 1, lo, hi);
    EXPECT_TRUE(torch::equal(y, ref)) << "range [" << lo << ", " << hi << "]";
  }
}

TEST(FakeQuantizeOp, PerChannelMatchesTorchOnEveryAxis) {
  torch::manual_seed(1);
  const auto x = torch::randn({6, 5, 4, 3}) * 2;
  for (int64_t axis = 0; axis < x.dim(); ++axis) {
    const int64_t channels = x.size(axis);
    const auto scale = torch::rand({channels}) * 0.1 + 0.01;
    const auto zero_point = torch::randint(-4, 4, {channels}, torch::dtype(torch::kInt));
    const auto y = qext::ops::fake_quantize(x, scale, zero_point, -8, 7, axis);
    const auto ref = torch::fake_quantize_per_channel_affine(x, scale, zero_point, axis, -8, 7);
    EXPECT_TRUE(torch::equal(y, ref)) << "axis " << axis;
  }
}

TEST(FakeQuantizeOp, StraightThroughGradientFromCpp) {
  torch::manual_seed(2);
  const auto base = torch::randn({8, 4, 6, 6}) * 2;
  const auto scale = torch::rand({4}) * 0.1 + 0.05;
  const auto zero_point = int_tensor({0, 1, -2, 3});
  const auto upstream = torch::randn_like(base);

  auto x = base.clone().requires_grad_();
  auto y = qext::ops::fake_quantize(x, scale, zero_point, -8, 7, 1);
  y.backward(upstream);
  auto x_ref = base.clone().requires_grad_();
  torch::fake_quantize_per_channel_affine(x_ref, scale, zero_point, 1, -8, 7).backward(upstream);
  EXPECT_TRUE(y.requires_grad());
  EXPECT_TRUE(torch::equal(x.grad(), x_ref.grad()));

  // channels_last input: the output keeps the layout and the gradient still lines up.
  auto x_cl = base.clone().contiguous(torch::MemoryFormat::ChannelsLast).requires_grad_();
  auto y_cl = qext::ops::fake_quantize(x_cl, scale, zero_point, -8, 7, 1);
  EXPECT_TRUE(y_cl.is_contiguous(torch::MemoryFormat::ChannelsLast));
  y_cl.backward(upstream);
  EXPECT_TRUE(torch::equal(x_cl.grad(), x_ref.grad()));
}

TEST(FakeQuantizeLearnableOp, GradientsMatchTorchFromCpp) {
  torch::manual_seed(3);
  const auto base = torch::randn({16, 3, 5, 5}) * 2;
  const auto upstream = torch::randn_like(base);
  auto scale = torch::tensor({0.11f}, torch::requires_grad());
  auto zero_point = torch::tensor({1.3f}, torch::requires_grad());
  auto x = base.clone().requires_grad_();
  auto y = qext::ops::fake_quantize_learnable(x, scale, zero_point, -8, 7, 0.25);
  y.backward(upstream);

  auto scale_ref = torch::tensor({0.11f}, torch::requires_grad());
  auto zero_point_ref = torch::tensor({1.3f}, torch::requires_grad());
  auto x_ref = base.clone().requires_grad_();
  auto y_ref = torch::_fake_quantize_learnable_per_tensor_affine(x_ref, scale_ref, zero_point_ref,
                                                                 -8, 7, 0.25);
  y_ref.backward(upstream);
  EXPECT_TRUE(torch::equal(y, y_ref));
  EXPECT_TRUE(torch::equal(x.grad(), x_ref.grad()));
  EXPECT_TRUE(torch::allclose(scale.grad(), scale_ref.grad(), 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(zero_point.grad(), zero_point_ref.grad(), 1e-5, 1e-5));
}

TEST(QuantizeOp, DequantizeOfQuantizeIsFakeQuantize) {
  torch::manual_seed(4);
  const auto x = torch::randn({3, 7, 9}) * 4;
  const auto scale = torch::rand({7}) * 0.1 + 0.02;
  const auto zero_point = torch::randint(0, 20, {7}, torch::dtype(torch::kInt));
  const auto q = qext::ops::quantize(x, scale, zero_point, 0, 255, 1);
  EXPECT_EQ(q.scalar_type(), torch::kByte);
  const auto back = qext::ops::dequantize(q, scale, zero_point, 1);
  EXPECT_TRUE(torch::equal(back, qext::ops::fake_quantize(x, scale, zero_point, 0, 255, 1)));
  const auto ref = torch::quantize_per_channel(x, scale.to(torch::kDouble),
                                               zero_point.to(torch::kLong), 1, torch::kQUInt8);
  EXPECT_TRUE(torch::equal(q, ref.int_repr()));
}

TEST(BadInput, ClearErrorsNamingTheArgument) {
  const auto x = torch::randn({4, 3});
  const auto zp = int_tensor({0});
  auto message_of = [](const std::function<void()>& f) -> std::string {
    try {
      f();
    } catch (const c10::Error& e) {
      return e.what_without_backtrace();
    }
    return "no error";
  };
  EXPECT_NE(message_of([&] {
              qext::ops::fake_quantize(x, torch::tensor({-0.1f}), zp, -8, 7);
            }).find("scale must be finite and positive"),
            std::string::npos);
  EXPECT_NE(message_of([&] { qext::ops::fake_quantize(x, 0.1, 9, -8, 7); }).find("got 9"),
            std::string::npos);
  EXPECT_NE(message_of([&] { qext::ops::fake_quantize(x, 0.1, 0, 7, 7); }).find("quant_min=7"),
            std::string::npos);
  EXPECT_NE(message_of([&] {
              qext::ops::fake_quantize(x, torch::ones({3}), torch::zeros({3}, torch::kInt), -8, 7,
                                       2);
            }).find("axis 2"),
            std::string::npos);
  EXPECT_NE(message_of([&] {
              qext::ops::fake_quantize(x.to(torch::kInt), 0.1, 0, -8, 7);
            }).find("floating-point"),
            std::string::npos);
}

TEST(MetaKernels, ShapesWithoutData) {
  const auto x = torch::empty({2, 3, 4}, torch::device(torch::kMeta));
  const auto y = qext::ops::fake_quantize(
      x, torch::empty({3}, torch::device(torch::kMeta)),
      torch::empty({3}, torch::device(torch::kMeta).dtype(torch::kInt)), -8, 7, 1);
  EXPECT_EQ(y.sizes(), x.sizes());
  EXPECT_EQ(y.device().type(), torch::kMeta);
}

}  // namespace
