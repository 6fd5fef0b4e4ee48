// Philox4x32-10 counter-based generator (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC'11), written once for host and device.
#pragma once
#include <cstdint>

#include "macros.h"

namespace layersel {

struct Philox4x32Out {
  uint32_t v[4];
};

LS_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Ten rounds of Philox4x32 on counter `c` with key `k`.
LS_HD Philox4x32Out philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                  uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, c0, hi0, lo0);
    philox_mulhilo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n1 = lo1;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    const uint32_t n3 = lo0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Philox4x32Out{{c0, c1, c2, c3}};
}

// The 32-bit random word for global element `index` of a stream keyed by
// `seed`: element i uses word (i % 4) of the block at counter i / 4. The
// result depends only on (seed, index), never on how work is split.
struct PhiloxStream {
  uint32_t k0, k1;
  LS_HD explicit PhiloxStream(uint64_t seed)
      : k0(static_cast<uint32_t>(seed)), k1(static_cast<uint32_t>(seed >> 32)) {}
  LS_HD Philox4x32Out block(uint64_t block_index) const {
    return philox4x32_10(static_cast<uint32_t>(block_index), static_cast<uint32_t>(block_index >> 32),
                         0u, 0u, k0, k1);
  }
};

// N consecutive blocks [first, first + N) at once, written word-major:
// words[4 * j + lane] is word `lane` of block first + j, i.e. the word of global
// element 4 * first + 4 * j + lane. Structure-of-arrays so that the rounds
// vectorise across blocks on the CPU; bit-identical to N calls of block().
template <int N>
LS_HD void philox_blocks(const PhiloxStream& stream, uint64_t first, uint32_t* words) {
  uint32_t c0[N], c1[N], c2[N], c3[N];
  for (int j = 0; j < N; ++j) {
    const uint64_t b = first + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(b);
    c1[j] = static_cast<uint32_t>(b >> 32);
    c2[j] = 0u;
    c3[j] = 0u;
  }
  uint32_t k0 = stream.k0, k1 = stream.k1;
  for (int round = 0; round < 10; ++round) {
    for (int j = 0; j < N; ++j) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[j];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[j];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[j] ^ k1;
      c1[j] = static_cast<uint32_t>(p1);
      c3[j] = static_cast<uint32_t>(p0);
      c0[j] = n0;
      c2[j] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int j = 0; j < N; ++j) {
    words[4 * j + 0] = c0[j];
    words[4 * j + 1] = c1[j];
    words[4 * j + 2] = c2[j];
    words[4 * j + 3] = c3[j];
  }
}

}  // namespace layersel
