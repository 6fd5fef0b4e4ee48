// A 64-bit fingerprint of a list of score tensors, and the Philox key that
// FedPM mask sampling derives from (a drawn seed, that fingerprint) when the
// caller gives no explicit seed.
//
// Why: fl4health's examples seed every client identically, so a key drawn from
// torch's generator alone gives every client the same uniforms, and FedPM's
// Bayesian aggregation assumes independent masks across clients. Clients whose
// scores differ must draw different keys; the same scores and the same draw
// must give the same key (reproducible rounds).
//
// Definition (identical on the CPU, the GPU and in the torch twin,
// layersel_ext/_torch_ops.py): with v_g the raw bits of element g of the
// concatenation of all tensors (zero-extended to 64 bits), lo/hi its 32-bit
// halves, l = g mod 64 and b = g div 64,
//
//   F = sum_g (lo(v_g) * W_lo[l] + hi(v_g) * W_hi[l]) * (2b + 1)   (mod 2^64)
//
// with odd 32-bit weights W. Two score lists that differ in one element give
// different F, always: the change is d * (odd) * (odd) with 0 < |d| < 2^32.
// Several differences collide only on a linear relation mod 2^64 among them.
// The sum is order-free (integer addition mod 2^64), so any thread or block
// split, atomics included, gives the same bits; and it vectorises (32 x 32 ->
// 64-bit multiplies), one read of the scores.
#pragma once
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace layersel {

constexpr int kFingerprintLanes = 64;

LS_HD uint64_t fingerprint_weight_lo(int lane) {
  return static_cast<uint64_t>(((static_cast<uint32_t>(lane) * 0x9E3779B9u) ^ 0x85EBCA6Bu) | 1u);
}
LS_HD uint64_t fingerprint_weight_hi(int lane) {
  return static_cast<uint64_t>(((static_cast<uint32_t>(lane) * 0xC2B2AE35u) ^ 0x27D4EB2Fu) | 1u);
}

// The term of one element, before its block weight (2b + 1).
LS_HD uint64_t fingerprint_term(uint64_t bits, int lane) {
  return (bits & 0xFFFFFFFFull) * fingerprint_weight_lo(lane) + (bits >> 32) * fingerprint_weight_hi(lane);
}

// The raw bits of one element (float, double, Half, BFloat16), zero-extended.
template <typename T>
LS_HD uint64_t raw_bits(T v) {
  if constexpr (sizeof(T) == 8) {
    uint64_t u;
    memcpy(&u, &v, 8);
    return u;
  } else if constexpr (sizeof(T) == 4) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  } else {
    uint16_t u;
    memcpy(&u, &v, 2);
    return u;
  }
}

LS_HD uint64_t fingerprint_block_weight(uint64_t g) { return 2 * (g / kFingerprintLanes) + 1; }

// splitmix64's finaliser: a bijection of 64-bit words.
LS_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The Philox key from a drawn seed and the scores' fingerprint. For a fixed
// draw, different (fingerprint, total) give different keys (mix64 is a
// bijection); for a fixed fingerprint, different draws do.
LS_HD uint64_t key_from_scores(uint64_t drawn_seed, uint64_t fingerprint, uint64_t total_numel) {
  return mix64(drawn_seed ^ mix64(fingerprint + mix64(total_numel)));
}

}  // namespace layersel
