// Every layersel op schema, in one place. Kernels: csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cu; Python twins: layersel_ext/_torch_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(layersel, m) {
  // Per-tensor sum over elements of float(model - initial)^2, as float64 [n].
  m.def("drift_sq_norms(Tensor[] model, Tensor[] initial) -> Tensor");
  // fl4health's score formula `kind` (a ScoreKind below kGiven,
  // csrc/common/scores.h) for every tensor; returns one flat buffer per dtype,
  // in order of first appearance.
  m.def("scores(Tensor[] model, Tensor[] initial, int kind) -> Tensor[]");
  // Bernoulli(sigmoid(score)) masks of all tensors, flat, in `dtype`;
  // Philox4x32-10 keyed by `seed` and the global element index. With
  // key_by_scores, the key is key_from_scores(seed, fingerprint of the scores)
  // (csrc/common/fingerprint.h): clients with different scores draw
  // independent streams even when their seeds are equal. With `counters`,
  // tensor i's elements take stream (and fingerprint) indices counters[i]..
  // instead of their place in the concatenation: a shard samples the masks
  // of the unsharded tensor it is part of (layersel_ext/_sharded.py).
  m.def("sample_masks(Tensor[] scores, int seed, ScalarType dtype, bool key_by_scores=False, int[]? counters=None) -> Tensor");
  // The scores' fingerprint (csrc/common/fingerprint.h) as int64[1] on their
  // device (the sum mod 2^64, its bits), indices as sample_masks' `counters`
  // say: a shard's partial sums add up (mod 2^64) to the unsharded model's.
  m.def("score_fingerprint(Tensor[] scores, int[]? counters=None) -> Tensor");
  // The same masks as a bitmap, uint8[ceil(n / 8)]: element g at bit g % 8 of
  // byte g / 8 (the compact wire format's bit order, layersel_ext/wire.py),
  // the unused high bits of the last byte zero (CPU and CUDA kernels; the
  // torch backend packs sample_masks' bytes).
  m.def("sample_mask_bits(Tensor[] scores, int seed, bool key_by_scores=False) -> Tensor");
  // The k-th largest (1-based) of all scores of formula `kind` (kGiven: the
  // scores are `initial`), each converted to `score_dtype` as torch.cat would: a 0-d
  // CPU tensor. Radix select, never a sort.
  m.def("kth_largest_score(Tensor[] model, Tensor[] initial, int kind, int k, ScalarType score_dtype) -> Tensor");
  // For each tensor t: the values of model[t] whose score passes thresholds[t]
  // and that are non-zero, and their row-major indices (N x ndim, int64).
  m.def("sparse_extract(Tensor[] model, Tensor[] initial, int kind, float[] thresholds) -> (Tensor[], Tensor[])");
  // sparse_extract with every threshold the k-th largest score (kth_largest_score
  // in score_dtype), for tensors of that floating dtype (float32 scores: integer
  // tensors too); on the CPU the sample select's pass also marks (one read of a
  // large model instead of two); on CUDA the k-th largest key becomes the
  // threshold on the device (one host sync, the chunk counts, instead of two).
  m.def("sparse_select(Tensor[] model, Tensor[] initial, int kind, int k, ScalarType score_dtype) -> (Tensor[], Tensor[])");
}

