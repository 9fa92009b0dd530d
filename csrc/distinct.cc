// The distinct keys of a batch and each key's index among them, as
// numpy.unique(keys, return_inverse=True) gives them, in O(n + range / 64):
// the keys are marked in a bitmap over [min, max], the set bits read in order
// are the sorted distinct keys, and a key's index is the number of set bits
// before it (a prefix count per 64-bit word, then one popcount).
//
// Used by jaxembed/_distinct.py for the host preprocess of every batch, where
// np.unique's sort was most of the time. Plain C entry point (ctypes).

#include <cstddef>
#include <cstdint>
#include <vector>

extern "C" {

#define JAXEMBED_EXPORT __attribute__((visibility("default")))

// The index of each key counts bits with popcount: one instruction where the
// CPU has it (chosen at load time), a bit-twiddling sequence otherwise.
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define JAXEMBED_POPCOUNT_CLONES __attribute__((target_clones("popcnt", "default")))
#endif
#endif
#ifndef JAXEMBED_POPCOUNT_CLONES
#define JAXEMBED_POPCOUNT_CLONES
#endif

// Writes the sorted distinct keys of keys[0..n) to distinct (room for n) and
// the index of each key among them to inverse; returns their number. Returns
// -1, writing nothing, when a key is negative or the range is over max_words
// 64-bit words (the caller sorts instead).
JAXEMBED_EXPORT JAXEMBED_POPCOUNT_CLONES int64_t
jaxembed_distinct(const int64_t* keys, int64_t n, int64_t max_words,
                  int64_t* distinct, int64_t* inverse) {
  if (n <= 0) return 0;
  int64_t lo = keys[0], hi = keys[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = keys[i] < lo ? keys[i] : lo;
    hi = keys[i] > hi ? keys[i] : hi;
  }
  if (lo < 0) return -1;
  const int64_t base = lo & ~int64_t{63};
  const int64_t words = ((hi - base) >> 6) + 1;
  if (words > max_words) return -1;
  std::vector<uint64_t> bits(static_cast<size_t>(words), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = keys[i] - base;
    bits[k >> 6] |= uint64_t{1} << (k & 63);
  }
  std::vector<int64_t> before(static_cast<size_t>(words));
  int64_t count = 0;
  for (int64_t w = 0; w < words; ++w) {
    before[w] = count;
    for (uint64_t b = bits[w]; b != 0; b &= b - 1) {
      distinct[count++] = base + (w << 6) + __builtin_ctzll(b);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = keys[i] - base;
    const uint64_t below = bits[k >> 6] & ((uint64_t{1} << (k & 63)) - 1);
    inverse[i] = before[k >> 6] + __builtin_popcountll(below);
  }
  return count;
}

}  // extern "C"
