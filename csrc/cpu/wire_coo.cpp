// The compact COO codec's torch wrapper: the checks a stream's meta gets here
// too, the two passes of common/coo_codec.h on at::parallel_for, and the value
// bytes copied in parallel. Outputs come from the output block cache: a client
// encodes and a server decodes every round, and fresh pages for a message of
// hundreds of MB cost more in page faults than the codec itself.
#include "wire_coo.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstring>

#include "../common/coo_codec.h"
#include "cpu_kernel_utils.h"
#include "output_block_cache.h"

namespace layersel {
namespace {

constexpr int64_t kCopyPiece = int64_t{1} << 20;  // bytes per parallel memcpy piece

auto on_threads() {
  return [](int64_t n, auto&& body) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { body(begin, end); });
  };
}

coo::Dims dims_of(const std::vector<int64_t>& shape, size_t t) {
  TORCH_CHECK_VALUE(shape.size() <= static_cast<size_t>(coo::kMaxNdim), "tensor #", t, ": ", shape.size(),
                    " dimensions (at most ", coo::kMaxNdim, ")");
  coo::Dims d;
  d.ndim = static_cast<int>(shape.size());
  bool empty = false;
  for (int k = 0; k < d.ndim; ++k) {
    TORCH_CHECK_VALUE(shape[k] >= 0, "tensor #", t, ": a negative size ", shape[k]);
    d.d[k] = shape[k];
    empty |= shape[k] == 0;
  }
  // As wire_coo's math.prod(shape) < 2**62: a zero size makes any shape empty.
  for (int k = 0; k < d.ndim && !empty; ++k) {
    const bool overflow = __builtin_mul_overflow(d.numel, static_cast<uint64_t>(shape[k]), &d.numel);
    TORCH_CHECK_VALUE(!overflow && d.numel < (uint64_t{1} << 62), "tensor #", t, ": a shape of 2**62 elements or more");
  }
  if (empty) d.numel = 0;
  return d;
}

// The encoder's first pass, compiled per ISA: its loop over flat offsets
// vectorises (the compact client's whole encode is mostly this and the write).
LS_CPU_CLONES coo::EncodeStats encode_stats_cloned(const coo::EncodeTensor& t, int64_t begin, int64_t end) {
  return coo::encode_stats(t, begin, end);
}

// The decoder's first pass, compiled per ISA (its loop over short varints vectorises).
LS_CPU_CLONES coo::DecodeStats decode_stats_cloned(const coo::DecodeTensor& t, int64_t begin, int64_t end) {
  return coo::decode_stats(t, begin, end);
}

// Copies pieces[i] = (from, to, bytes), split into kCopyPiece parts, in parallel.
void copy_all(const std::vector<std::tuple<const uint8_t*, uint8_t*, int64_t>>& pieces) {
  std::vector<int64_t> sizes;
  for (const auto& p : pieces) sizes.push_back(std::get<2>(p));
  coo::Ranges(std::move(sizes), kCopyPiece).each(on_threads(), [&](int32_t i, int64_t, int64_t begin, int64_t end) {
    std::memcpy(std::get<1>(pieces[i]) + begin, std::get<0>(pieces[i]) + begin, static_cast<size_t>(end - begin));
  });
}

}  // namespace

std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>, at::Tensor, at::Tensor> coo_encode(
    const std::vector<at::Tensor>& indices, const std::vector<std::vector<int64_t>>& shapes,
    const std::vector<at::Tensor>& value_bytes) {
  TORCH_CHECK_VALUE(indices.size() == shapes.size() && shapes.size() == value_bytes.size(), "coo_encode: ",
                    indices.size(), " index arrays, ", shapes.size(), " shapes, ", value_bytes.size(), " value arrays");
  std::vector<coo::EncodeTensor> ts(indices.size());
  std::vector<int64_t> nnz(indices.size());
  for (size_t t = 0; t < indices.size(); ++t) {
    const at::Tensor& idx = indices[t];
    ts[t].dims = dims_of(shapes[t], t);
    const bool flat = idx.dim() == 1;
    TORCH_CHECK_VALUE(idx.device().is_cpu() && idx.scalar_type() == at::kLong && idx.is_contiguous() &&
                          (flat || (idx.dim() == 2 && idx.size(1) == ts[t].dims.ndim)),
                      "tensor #", t, ": indices must be a contiguous int64 [nnz, ", ts[t].dims.ndim,
                      "] or [nnz] (flat offsets) CPU tensor");
    if (flat) {
      // Flat row-major offsets are the indices of the tensor seen as 1-D: the
      // same payload, checked against numel, without a row per entry.
      ts[t].dims.ndim = 1;
      ts[t].dims.d[0] = static_cast<int64_t>(ts[t].dims.numel);
    }
    ts[t].indices = idx.data_ptr<int64_t>();
    ts[t].nnz = nnz[t] = idx.size(0);
  }
  const coo::Ranges ranges(nnz);
  // Dense tensors are written as bitmaps straight away (one read of their
  // indices); when one turns out not to be in order and in range (or another
  // tensor is out of range: the first such is reported), again from a full plan.
  coo::EncodePlan plan;
  at::Tensor positions;
  for (bool speculative : {true, false}) {
    plan = coo::plan_encoding(ts, ranges, on_threads(), speculative, encode_stats_cloned);
    if (plan.out_of_range >= 0) {
      if (speculative) continue;
      return {plan.out_of_range, {}, {}, at::Tensor(), at::Tensor()};
    }
    positions = empty_cpu_output(static_cast<int64_t>(plan.total), at::kByte);
    if (coo::write_encoding(ts, ranges, plan, positions.data_ptr<uint8_t>(), on_threads())) break;
  }

  int64_t total = 0;
  bool consecutive = !value_bytes.empty();  // every tensor's bytes right after the one before, in one storage
  for (size_t t = 0; t < value_bytes.size(); ++t) {
    const at::Tensor& v = value_bytes[t];
    const uint8_t* p = bytes_of(v, "value bytes");
    if (t > 0) {
      const at::Tensor& before = value_bytes[t - 1];
      consecutive &= v.storage().is_alias_of(before.storage()) && p == before.data_ptr<uint8_t>() + before.numel();
    }
    total += v.numel();
  }
  if (consecutive) {  // the values already lie as the stream has them (sparse_select_offsets' output): no copy
    const at::Tensor& first = value_bytes.front();
    at::Tensor values = at::empty({0}, at::kByte).set_(first.storage(), first.storage_offset(), {total}, {1});
    return {-1, std::vector<int64_t>(plan.code.begin(), plan.code.end()),
            std::vector<int64_t>(plan.bytes.begin(), plan.bytes.end()), positions, values};
  }
  at::Tensor values = empty_cpu_output(total, at::kByte);
  std::vector<std::tuple<const uint8_t*, uint8_t*, int64_t>> pieces;
  int64_t at = 0;
  for (const at::Tensor& v : value_bytes) {
    pieces.emplace_back(v.data_ptr<uint8_t>(), values.data_ptr<uint8_t>() + at, v.numel());
    at += v.numel();
  }
  copy_all(pieces);
  return {-1, std::vector<int64_t>(plan.code.begin(), plan.code.end()),
          std::vector<int64_t>(plan.bytes.begin(), plan.bytes.end()), positions, values};
}

std::tuple<int64_t, std::string, std::vector<at::Tensor>, at::Tensor, std::vector<int64_t>> coo_decode(
    const std::vector<int64_t>& codes, const std::vector<std::vector<int64_t>>& shapes,
    const std::vector<int64_t>& nnz, const at::Tensor& positions, const std::vector<int64_t>& position_bytes,
    const at::Tensor& values, const std::vector<int64_t>& value_bytes, int64_t max_bytes) {
  const size_t n = codes.size();
  TORCH_CHECK_VALUE(shapes.size() == n && nnz.size() == n && position_bytes.size() == n && value_bytes.size() == n,
                    "coo_decode: the per-tensor lists differ in length");
  const uint8_t* pos = bytes_of(positions, "positions");
  const uint8_t* raw = bytes_of(values, "values");
  std::vector<coo::DecodeTensor> ts(n);
  int64_t p = 0, r = 0;
  for (size_t t = 0; t < n; ++t) {
    ts[t].dims = dims_of(shapes[t], t);
    TORCH_CHECK_VALUE(nnz[t] >= 0 && static_cast<uint64_t>(nnz[t]) <= ts[t].dims.numel, "tensor #", t, ": ", nnz[t],
                      " entries in a tensor of ", ts[t].dims.numel, " elements");
    TORCH_CHECK_VALUE(position_bytes[t] >= 0 && position_bytes[t] <= positions.numel() - p && value_bytes[t] >= 0 &&
                          value_bytes[t] <= values.numel() - r,
                      "tensor #", t, ": its bytes run past the stream's arrays");
    ts[t].code = codes[t];
    ts[t].payload = pos + p;
    ts[t].size = static_cast<uint64_t>(position_bytes[t]);
    ts[t].nnz = nnz[t];
    p += position_bytes[t];
    r += value_bytes[t];
  }
  TORCH_CHECK_VALUE(p == positions.numel() && r == values.numel(), "coo_decode: ", p, " position bytes and ", r,
                    " value bytes listed, the arrays hold ", positions.numel(), " and ", values.numel());
  // What the outputs will take, before anything is allocated: a peer's stream
  // must not make this process allocate what its caller did not allow.
  uint64_t need = 0;
  for (size_t t = 0; t < n; ++t) {
    need = coo::capped_sum(need, coo::decoded_bytes(static_cast<uint64_t>(nnz[t]), ts[t].dims.ndim,
                                                    static_cast<uint64_t>(value_bytes[t])));
  }
  TORCH_CHECK_VALUE(max_bytes >= 0 && need <= static_cast<uint64_t>(max_bytes), "decoding needs ", need,
                    " bytes, more than the ", max_bytes, " allowed");
  coo::DecodePlan plan = coo::plan_decoding(ts, on_threads(), decode_stats_cloned);
  if (plan.error.tensor >= 0) return {plan.error.tensor, plan.error.why, {}, at::Tensor(), {}};

  // Every tensor's indices are views of one buffer: one block of the cache
  // however many tensors (small ones alone would be fresh allocations).
  int64_t rows = 0;
  for (size_t t = 0; t < n; ++t) rows += nnz[t] * ts[t].dims.ndim;
  const at::Storage storage = empty_cpu_output(rows, at::kLong).storage();
  std::vector<at::Tensor> indices;
  rows = 0;
  for (size_t t = 0; t < n; ++t) {
    const int64_t ndim = ts[t].dims.ndim;
    indices.push_back(at::empty({0}, at::kLong).set_(storage, rows, {nnz[t], ndim}, {ndim, 1}));
    ts[t].indices = indices.back().data_ptr<int64_t>();
    rows += nnz[t] * ndim;
  }
  coo::write_decoding(ts, plan, on_threads());

  std::vector<int64_t> starts;
  int64_t total = 0;
  for (size_t t = 0; t < n; ++t) {
    starts.push_back(total);
    total += (value_bytes[t] + 63) / 64 * 64;
  }
  at::Tensor out = empty_cpu_output(total, at::kByte);
  std::vector<std::tuple<const uint8_t*, uint8_t*, int64_t>> pieces;
  r = 0;
  for (size_t t = 0; t < n; ++t) {
    pieces.emplace_back(raw + r, out.data_ptr<uint8_t>() + starts[t], value_bytes[t]);
    r += value_bytes[t];
  }
  copy_all(pieces);
  return {-1, std::string(), indices, out, starts};
}

}  // namespace layersel
