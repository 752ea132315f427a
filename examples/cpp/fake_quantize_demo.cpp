// Fake-quantizes a tensor with qext from C++, trains its LSQ scale for a few steps, and prints
// the results. Exits non-zero if qext's result disagrees with the hand-computed one.
#include <qext/qext.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  // 0.26 / 0.1 = 2.6 -> 3 levels; 0.25 / 0.1 = 2.5 -> 2 (half to even); 1.0 -> 10 clamps to 7.
  const torch::Tensor x = torch::tensor({0.26f, 0.25f, 1.0f, -1.0f});
  const torch::Tensor y = qext::ops::fake_quantize(x, 0.1, 0, -8, 7);
  const torch::Tensor expected = torch::tensor({0.3f, 0.2f, 0.7f, -0.8f});
  std::cout << "qext " << qext::version()
            << " (CUDA kernels: " << (qext::with_cuda() ? "yes" : "no") << ")\nfake_quantize(" << x
            << ") =\n"
            << y << "\n";
  if (!torch::allclose(y, expected)) {
    std::cerr << "unexpected result, expected " << expected << "\n";
    return 1;
  }

  // LSQ: learn the step size of a 4-bit quantizer to reduce the quantization error of w.
  torch::manual_seed(0);
  const torch::Tensor w = torch::randn({256});
  torch::Tensor scale = torch::full({1}, 0.5f, torch::requires_grad());
  const torch::Tensor zero_point = torch::zeros({1});
  torch::optim::SGD opt({scale}, 0.01);
  double first_loss = 0.0, loss_value = 0.0;
  for (int step = 0; step < 50; ++step) {
    opt.zero_grad();
    auto loss = (qext::ops::fake_quantize_learnable(w, scale, zero_point, -8, 7) - w).pow(2).mean();
    loss.backward();
    opt.step();
    loss_value = loss.item<double>();
    if (step == 0) first_loss = loss_value;
  }
  std::cout << "LSQ step size " << scale.item<float>() << ", quantization MSE " << first_loss
            << " -> " << loss_value << "\n";
  return loss_value < first_loss ? 0 : 1;
}
