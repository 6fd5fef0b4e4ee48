// ctest: the compiled CPU ops called through the dispatcher, against ATen.
#include <torch/torch.h>

#include <cstdio>

#include "tests/check.h"


static c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

int main() {
  torch::manual_seed(0);
  std::vector<at::Tensor> a = {torch::randn({70000}), torch::randn({3, 5}).to(torch::kDouble),
                               torch::randint(0, 100, {9}, torch::kLong), torch::randn({0})};
  std::vector<at::Tensor> b;
  for (auto& t : a) b.push_back(t.clone().add_(1));

  auto drift = op("layersel::drift_sq_norms").typed<at::Tensor(at::TensorList, at::TensorList)>();
  at::Tensor sums = drift.call(a, b);
  LS_CHECK(sums.numel() == 4);
  for (size_t i = 0; i < a.size(); ++i) {
    const double want = (a[i] - b[i]).to(torch::kFloat).to(torch::kDouble).pow(2).sum().item<double>();
    LS_CHECK(std::abs(sums[i].item<double>() - want) <= 1e-6 * std::max(1.0, want));
  }

  auto scores = op("layersel::scores").typed<std::vector<at::Tensor>(at::TensorList, at::TensorList, int64_t)>();
  std::vector<at::Tensor> s = scores.call(a, b, 2);
  LS_CHECK(s.size() == 3);  // float32, float64, int64 groups
  LS_CHECK(torch::equal(s[0].slice(0, 0, 70000), (a[0] - b[0]).abs()));

  auto masks = op("layersel::sample_masks")
                   .typed<at::Tensor(at::TensorList, int64_t, at::ScalarType, bool, c10::optional<at::IntArrayRef>)>();
  std::vector<at::Tensor> sc = {torch::zeros({1000}), torch::full({7}, 50.0)};
  at::Tensor m1 = masks.call(sc, 7, at::kLong, false, c10::nullopt), m2 = masks.call(sc, 7, at::kLong, false, c10::nullopt);
  LS_CHECK(torch::equal(m1, m2));
  // Keyed by the scores: reproducible, and another stream than the seed's own.
  at::Tensor k1 = masks.call(sc, 7, at::kLong, true, c10::nullopt), k2 = masks.call(sc, 7, at::kLong, true, c10::nullopt);
  LS_CHECK(torch::equal(k1, k2) && !torch::equal(k1, m1));
  // Counters: the second tensor sampled alone at its place in the stream gives the same masks.
  const std::vector<int64_t> at_1000 = {1000};
  at::Tensor alone = masks.call({sc[1]}, 7, at::kLong, false, at::IntArrayRef(at_1000));
  LS_CHECK(torch::equal(alone, m1.slice(0, 1000)));
  LS_CHECK(m1.slice(0, 1000).sum().item<int64_t>() == 7);
  const double mean = m1.slice(0, 0, 1000).to(torch::kDouble).mean().item<double>();
  LS_CHECK(mean > 0.4 && mean < 0.6);

  return report("ops through the dispatcher");
}
