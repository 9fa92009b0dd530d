// The distinct keys of a batch and each key's index among them, as
// numpy.unique(keys, return_inverse=True) gives them, in O(n + range / 64):
// the keys are marked in a bitmap over [min, max], the set bits read in order
// are the sorted distinct keys, and a key's index is the number of set bits
// before it (a prefix count per 64-bit word, then one popcount).
//
// Used by jaxembed/_distinct.py for the host preprocess of every batch, where
// np.unique's sort was most of the time. Plain C entry points (ctypes).
//
// Also here: a plan's slots grouped by the row they hold (jaxembed_transpose,
// lookup.transpose_slots' counting sort).

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

// The uses of rows[0..num_rows) held by slots[rows x width] (an entry outside
// [0, num_rows) holds none), grouped by row in slot order: first[p] = the slot
// row of row p's first use (rows if none), and its further uses 8 to a block in
// rest[blocks x 8] (padding: rows), rest_rows[b] = the row of block b (padding:
// num_rows), rows in order. weights (nullable) [rows x width] go along into
// first_w and rest_w (padding 0). Returns the blocks used; over blocks, writes
// nothing past the counts and returns that number (the caller raises).
JAXEMBED_EXPORT int64_t jaxembed_transpose(const int32_t* slots, int64_t rows, int64_t width,
                                           const float* weights, int64_t num_rows,
                                           int64_t blocks, int32_t* first, float* first_w,
                                           int32_t* rest, float* rest_w, int32_t* rest_rows) {
  const int64_t n = rows * width;
  const uint64_t limit = static_cast<uint64_t>(num_rows);
  std::vector<int64_t> next(static_cast<size_t>(num_rows), 0);  // counts, then rest slots
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t p = static_cast<uint32_t>(slots[i]);
    if (p < limit) ++next[p];
  }
  int64_t used = 0;
  for (int64_t p = 0; p < num_rows; ++p) {
    const int64_t further = (next[p] + 6) / 8;  // blocks of the uses after the first
    next[p] = used * 8;
    for (int64_t b = 0; b < further && used + b < blocks; ++b) rest_rows[used + b] = p;
    used += further;
  }
  if (used > blocks) return used;
  for (int64_t b = used; b < blocks; ++b) rest_rows[b] = num_rows;
  for (int64_t p = 0; p < num_rows; ++p) first[p] = static_cast<int32_t>(rows);
  for (int64_t k = 0; k < blocks * 8; ++k) rest[k] = static_cast<int32_t>(rows);
  if (weights != nullptr) {
    for (int64_t p = 0; p < num_rows; ++p) first_w[p] = 0.0f;
    for (int64_t k = 0; k < blocks * 8; ++k) rest_w[k] = 0.0f;
  }
  // Rows in order, each row's slots in order: a row p's first use finds first[p] unset.
  const int32_t unset = static_cast<int32_t>(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = slots + r * width;
    const float* row_w = weights != nullptr ? weights + r * width : nullptr;
    for (int64_t k = 0; k < width; ++k) {
      const uint64_t p = static_cast<uint32_t>(row[k]);
      if (p >= limit) continue;
      if (first[p] == unset) {
        first[p] = static_cast<int32_t>(r);
        if (row_w != nullptr) first_w[p] = row_w[k];
      } else {
        const int64_t at = next[p]++;
        rest[at] = static_cast<int32_t>(r);
        if (row_w != nullptr) rest_w[at] = row_w[k];
      }
    }
  }
  return used;
}

}  // extern "C"
