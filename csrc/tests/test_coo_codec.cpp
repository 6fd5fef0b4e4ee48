// ctest: the compact COO codec (common/coo_codec.h) without torch, built twice:
// plainly and under AddressSanitizer + UndefinedBehaviorSanitizer (CMakeLists:
// test_coo_codec_sanitized), so any read or write out of bounds, overflow or
// misaligned access in the decoder fails the test.
//   1. known bytes: one small payload per encoding, written out by hand;
//   2. round trips of random tensors of every encoding, several ranges long, the
//      ranges run in a scrambled order (no range may depend on another's timing);
//   3. a seeded mutation fuzz of valid payloads (kFuzzRounds of them, all run
//      through the decoder): every accepted stream decodes into exactly sized
//      outputs, every index inside its shape;
//   4. flat offsets (the tensor seen as 1-D, as the client's selection hands
//      them over) encode to the same bytes as the index rows.
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/coo_codec.h"
#include "tests/check.h"

using namespace layersel;


// Calls body over [0, n) in pieces of one range, last range first.
static void scrambled_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  for (int64_t r = n - 1; r >= 0; --r) body(r, r + 1);
}

static coo::Dims dims(std::vector<int64_t> shape) {
  coo::Dims d;
  d.ndim = static_cast<int>(shape.size());
  for (int k = 0; k < d.ndim; ++k) d.d[k] = shape[k], d.numel *= static_cast<uint64_t>(shape[k]);
  return d;
}

static std::vector<int64_t> rows_of(const std::vector<uint64_t>& offsets, const coo::Dims& d) {
  std::vector<int64_t> rows(offsets.size() * d.ndim);
  for (size_t i = 0; i < offsets.size(); ++i) {
    uint64_t rest = offsets[i];
    for (int k = d.ndim - 1; k >= 0; --k) {
      rows[i * d.ndim + k] = static_cast<int64_t>(rest % static_cast<uint64_t>(d.d[k]));
      rest /= static_cast<uint64_t>(d.d[k]);
    }
  }
  return rows;
}

struct Encoded {
  int code = 0;
  std::vector<uint8_t> payload;
};

// code -1: an index outside the shape.
static Encoded encode(const std::vector<int64_t>& rows, const coo::Dims& d, int64_t nnz) {
  std::vector<coo::EncodeTensor> ts(1);
  ts[0].indices = rows.data();
  ts[0].nnz = nnz;
  ts[0].dims = d;
  const coo::Ranges ranges({ts[0].nnz});
  Encoded e;
  // As csrc/cpu/wire_coo.cpp: a dense tensor is written as a bitmap unplanned,
  // and planned and written again when that write finds it out of order.
  for (bool speculative : {true, false}) {
    const coo::EncodePlan plan = coo::plan_encoding(ts, ranges, scrambled_for, speculative);
    e.code = plan.out_of_range >= 0 ? -1 : plan.code[0];
    if (plan.out_of_range >= 0 && speculative) continue;
    if (plan.out_of_range >= 0) return e;
    e.payload.assign(plan.total + 1, 0xEE);  // one guard byte after the payload
    const bool valid = coo::write_encoding(ts, ranges, plan, e.payload.data(), scrambled_for);
    LS_CHECK(e.payload.back() == 0xEE);
    e.payload.pop_back();
    if (valid) return e;
    LS_CHECK(speculative);  // a full plan is always valid
  }
  return e;
}

// Decodes into a buffer of exactly nnz * ndim entries; returns the error ("" when accepted).
static std::string decode(int64_t code, const std::vector<uint8_t>& payload, int64_t nnz, const coo::Dims& d,
                          std::vector<int64_t>* rows) {
  std::vector<coo::DecodeTensor> ts(1);
  ts[0].code = code;
  // A heap copy of exactly the payload's size, so ASan sees any read past it.
  std::vector<uint8_t> exact(payload);
  ts[0].payload = exact.data();
  ts[0].size = exact.size();
  ts[0].nnz = nnz;
  ts[0].dims = d;
  const coo::DecodePlan plan = coo::plan_decoding(ts, scrambled_for);
  if (plan.error.tensor >= 0) return plan.error.why.empty() ? "(empty reason)" : plan.error.why;
  rows->assign(static_cast<size_t>(nnz) * d.ndim, -1);
  ts[0].indices = rows->data();
  coo::write_decoding(ts, plan, scrambled_for);
  return {};
}

static void test_known_bytes() {
  const coo::Dims d = dims({1000});
  struct Case {
    std::vector<uint64_t> offsets;
    int code;
    std::vector<uint8_t> payload;
  };
  const Case cases[] = {
      {{0, 5, 300}, coo::kVarint, {0x00, 0x04, 0xA6, 0x02}},  // gaps 0, 4, 294
      {{3, 1}, coo::kU32, {3, 0, 0, 0, 1, 0, 0, 0}},           // not increasing
      {{1, 2, 4, 200}, coo::kGap8, {1, 0, 1, 195}},
      {{}, coo::kU32, {}},
  };
  for (const Case& c : cases) {
    const Encoded e = encode(rows_of(c.offsets, d), d, static_cast<int64_t>(c.offsets.size()));
    LS_CHECK(e.code == c.code);
    LS_CHECK(e.payload == c.payload);
  }
  std::vector<uint64_t> dense;  // every other element of 20: a bitmap of 3 bytes
  for (uint64_t i = 0; i < 20; i += 2) dense.push_back(i);
  const coo::Dims d20 = dims({4, 5});
  const Encoded e = encode(rows_of(dense, d20), d20, static_cast<int64_t>(dense.size()));
  LS_CHECK(e.code == coo::kBitmap);
  LS_CHECK((e.payload == std::vector<uint8_t>{0x55, 0x55, 0x05}));
}

static std::vector<uint64_t> random_offsets(std::mt19937_64& rng, uint64_t numel, int pattern, int64_t n) {
  std::vector<uint64_t> out;
  if (numel == 0) return out;
  if (pattern == 0 && numel > (1u << 20)) pattern = 1;
  if (pattern == 0) {  // dense: a bitmap
    std::bernoulli_distribution keep(0.4);
    for (uint64_t i = 0; i < numel; ++i)
      if (keep(rng)) out.push_back(i);
    return out;
  }
  if (pattern == 4) {  // unordered
    for (int64_t i = 0; i < n; ++i) out.push_back(rng() % numel);
    return out;
  }
  const uint64_t top[] = {0, 200, 60000, 1ull << 31, 1ull << 40};
  uint64_t at = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t gap = pattern == 3 ? (rng() % 2 ? rng() % 100 : rng() % top[4]) : rng() % top[pattern];
    if (i) at += 1;
    if (at + gap >= numel) break;
    at += gap;
    out.push_back(at);
  }
  return out;
}

// A dense tensor (bitmap_wins) out of order or with an index outside its shape:
// the unplanned bitmap write notices, and the full plan gives u32 offsets or
// refuses.
static void test_dense_but_unordered_or_out_of_range() {
  const coo::Dims d = dims({10, 10});
  std::vector<uint64_t> offsets;
  for (uint64_t i = 0; i < 60; ++i) offsets.push_back(i);
  std::swap(offsets[10], offsets[50]);
  Encoded e = encode(rows_of(offsets, d), d, 60);
  LS_CHECK(e.code == coo::kU32);
  std::vector<int64_t> back;
  LS_CHECK(decode(e.code, e.payload, 60, d, &back).empty() && back == rows_of(offsets, d));
  std::vector<int64_t> rows = rows_of(std::vector<uint64_t>(offsets.begin(), offsets.begin() + 40), d);
  rows[2 * 30 + 1] = 10;  // column 10 of a 10-column tensor
  LS_CHECK(encode(rows, d, 40).code == -1);
  rows[2 * 30 + 1] = -1;
  LS_CHECK(encode(rows, d, 40).code == -1);
}

// Rows of 64 and 128 elements (every bitmap word inside one row), of 65 and 63
// (words across rows), and 3-D with a last dimension of 64: both branches of
// the bitmap decoder's word loop.
static const std::vector<std::vector<int64_t>> kShapes = {
    {300, 700}, {1 << 20, 1 << 12}, {7, 1, 5, 1, 3}, {131073},   {0},      {4, 0, 2},
    {},         {1 << 30, 1 << 20}, {2000, 64},      {900, 128}, {999, 65}, {30, 50, 64}, {777, 63}};

static void test_round_trips() {
  std::mt19937_64 rng(7);
  const std::vector<std::vector<int64_t>>& shapes = kShapes;
  for (const auto& shape : shapes) {
    const coo::Dims d = dims(shape);
    for (int pattern = 0; pattern < 5; ++pattern) {
      const std::vector<uint64_t> offsets = random_offsets(rng, d.numel, pattern, 150000);
      const std::vector<int64_t> rows = rows_of(offsets, d);
      const Encoded e = encode(rows, d, static_cast<int64_t>(offsets.size()));
      std::vector<int64_t> back;
      const std::string why = decode(e.code, e.payload, static_cast<int64_t>(offsets.size()), d, &back);
      LS_CHECK(why.empty());
      LS_CHECK(back == rows);
    }
  }
}

static void test_flat_offsets_encode_as_rows() {
  std::mt19937_64 rng(11);
  for (const auto& shape : kShapes) {
    const coo::Dims d = dims(shape);
    coo::Dims flat = dims({static_cast<int64_t>(d.numel)});
    for (int pattern = 0; pattern < 5; ++pattern) {
      const std::vector<uint64_t> offsets = random_offsets(rng, d.numel, pattern, 20000);
      const int64_t nnz = static_cast<int64_t>(offsets.size());
      const std::vector<int64_t> as_offsets(offsets.begin(), offsets.end());
      const Encoded rows = encode(rows_of(offsets, d), d, nnz), offs = encode(as_offsets, flat, nnz);
      LS_CHECK(rows.code == offs.code && rows.payload == offs.payload);
    }
  }
}

constexpr int kFuzzRounds = 12000;

static void test_mutated_payloads() {
  std::mt19937_64 rng(2027);
  int accepted = 0, refused = 0;
  for (int round = 0; round < kFuzzRounds; ++round) {
    const std::vector<int64_t> shape = round % 4 == 0   ? std::vector<int64_t>{40, 40, 3}
                                       : round % 4 == 1 ? std::vector<int64_t>{70000}
                                       : round % 4 == 2 ? std::vector<int64_t>{1100, 64}
                                                        : std::vector<int64_t>{1 << 16, 1 << 16};
    const coo::Dims d = dims(shape);
    const int64_t n = round % 25 == 0 ? 150000 : static_cast<int64_t>(rng() % 3000);  // every 25th: several ranges
    const std::vector<uint64_t> offsets = random_offsets(rng, d.numel, static_cast<int>(rng() % 5), n);
    Encoded e = encode(rows_of(offsets, d), d, static_cast<int64_t>(offsets.size()));
    int64_t code = e.code, nnz = static_cast<int64_t>(offsets.size());
    std::vector<uint8_t> p = e.payload;
    switch (rng() % 6) {
      case 0:
        if (!p.empty()) p[rng() % p.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
        break;
      case 1:
        p.resize(rng() % (p.size() + 1));
        break;
      case 2:
        for (int k = static_cast<int>(rng() % 12); k >= 0; --k) p.push_back(static_cast<uint8_t>(rng()));
        break;
      case 3:
        code = static_cast<int64_t>(rng() % 9);
        break;
      case 4:
        nnz = static_cast<int64_t>(rng() % static_cast<uint64_t>(2 * nnz + 2));
        if (static_cast<uint64_t>(nnz) > d.numel) nnz = static_cast<int64_t>(d.numel);
        break;
      default:
        for (auto& b : p)
          if (rng() % 64 == 0) b = static_cast<uint8_t>(rng());
    }
    std::vector<int64_t> rows;
    if (decode(code, p, nnz, d, &rows).empty()) {
      ++accepted;
      for (size_t i = 0; i < rows.size(); ++i) {
        const int64_t size = d.d[i % static_cast<size_t>(d.ndim)];
        LS_CHECK(rows[i] >= 0 && rows[i] < size);
      }
    } else {
      ++refused;
    }
  }
  LS_CHECK(accepted > 100 && refused > 1000 && accepted + refused == kFuzzRounds);
  std::printf("fuzz: %d mutated payloads decoded: %d accepted (in range), %d refused\n", accepted + refused,
              accepted, refused);
}

// What a decoder computes before it allocates: exact for sane sizes, and never
// wrapped (so never small) for a hostile meta's huge ones.
static void test_decoded_bytes() {
  LS_CHECK(coo::decoded_bytes(0, 0, 0) == 0);
  LS_CHECK(coo::decoded_bytes(1, 0, 1) == 64);  // a 0-d tensor's one value, padded
  LS_CHECK(coo::decoded_bytes(10, 2, 40) == 160 + 64);
  LS_CHECK(coo::decoded_bytes(uint64_t{1} << 20, 64, uint64_t{1} << 20) == (uint64_t{1} << 29) + (uint64_t{1} << 20));
  LS_CHECK(coo::decoded_bytes(uint64_t{1} << 61, 64, 0) == coo::kSaturated);  // nnz * ndim * 8 wraps 2**64
  LS_CHECK(coo::decoded_bytes(uint64_t{1} << 58, 8, 0) == coo::kSaturated);   // exactly 2**64
  LS_CHECK(coo::decoded_bytes(0, 0, ~uint64_t{0}) == coo::kSaturated);         // value bytes + 63 would wrap
  LS_CHECK(coo::decoded_bytes(uint64_t{1} << 59, 1, uint64_t{1} << 62) == coo::kSaturated);
  LS_CHECK(coo::capped_sum(coo::kSaturated, coo::kSaturated) == coo::kSaturated);
  LS_CHECK(coo::capped_sum(~uint64_t{0}, 2) == coo::kSaturated);
  LS_CHECK(coo::capped_sum(3, 4) == 7);
  // A sum over many saturated tensors stays saturated.
  uint64_t need = 0;
  for (int t = 0; t < 5; ++t) need = coo::capped_sum(need, coo::decoded_bytes(uint64_t{1} << 60, 64, 0));
  LS_CHECK(need == coo::kSaturated);
}

// A range's sum of (gap + 1) that long varints saturate stays saturated through
// the short varints after them (a piece's own sum is added saturating), and a
// later huge gap cannot wrap it back to a small number.
static void test_saturated_varint_sum() {
  std::vector<uint8_t> v;
  auto put = [&](uint64_t g) {
    for (; g >= 0x80; g >>= 7) v.push_back(static_cast<uint8_t>(g | 0x80));
    v.push_back(static_cast<uint8_t>(g));
  };
  for (int k = 0; k < 3; ++k) put((uint64_t{1} << 62) - 2);  // the sum passes 2**63: saturated
  while (v.size() < 256) put(5);                             // the rest of that piece
  for (int k = 0; k < 256; ++k) put(100);                    // short varints only
  put((uint64_t{1} << 63) - 2);                              // gap + 1 = 2**63 - 1
  while (v.size() % 256) put(5);
  coo::DecodeTensor t;
  t.code = coo::kVarint;
  t.payload = v.data();
  t.size = v.size();
  t.dims = dims({(int64_t{1} << 62) - 1});
  const coo::DecodeStats st = coo::decode_stats(t, 0, static_cast<int64_t>(v.size()));
  LS_CHECK(st.sum == coo::kSaturated);
  LS_CHECK(st.gap_past);
}

int main() {
  test_decoded_bytes();
  test_saturated_varint_sum();
  test_known_bytes();
  test_dense_but_unordered_or_out_of_range();
  test_round_trips();
  test_flat_offsets_encode_as_rows();
  test_mutated_payloads();
  return report("coo codec");
}
