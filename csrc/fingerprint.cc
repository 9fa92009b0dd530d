// FarmHash Fingerprint64 of many keys at once, and vocabulary lookups built on it: the hash
// behind TF's tf.strings.to_hash_bucket_fast and tf.lookup.StaticVocabularyTable.
//
// The hash is FarmHash's "na" 64-bit hash (github.com/google/farmhash, MIT licence), which
// FarmHash fixes forever as Fingerprint64 so that stored hashes stay valid. jaxembed's tests check
// every length from 0 to 300 bytes, and adversarial keys, against TF's own ops.
//
// Plain C entry points for ctypes (see jaxembed/_fingerprint.py). Keys come in as numpy lays
// them out, of one of three kinds:
//   kind 0  n fixed-width byte strings (numpy "S<width>"; a key ends at its last non-NUL byte)
//   kind 1  n fixed-width UCS-4 strings (numpy "U<width>"), hashed as UTF-8
//   kind 2  n int64 ids, hashed as their decimal text (tf.strings.as_string)
// Entry points (work split over `threads` threads):
//   jaxembed_hash_buckets  out[i] = Fingerprint64(key i) mod num_bins (num_bins 0: the hash)
//   jaxembed_vocab_slots   an open-addressing index of a vocabulary's keys
//   jaxembed_vocab_lookup  out[i] = the row of key i in the vocabulary, else
//                          num_keys + Fingerprint64(key i) mod num_oov (StaticVocabularyTable)
// Each returns -1, or the index of the first key holding a code point UTF-8 cannot encode (a
// lone surrogate).

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr uint64_t kK0 = 0xc3a5c85c97cb3127ULL;
constexpr uint64_t kK1 = 0xb492b66fbe98f273ULL;
constexpr uint64_t kK2 = 0x9ae16a3b2f90404fULL;

struct Pair {
  uint64_t first, second;
};

inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // little-endian hosts (x86-64, aarch64)
  return v;
}

inline uint64_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint64_t Rot(uint64_t v, int s) { return s == 0 ? v : (v >> s) | (v << (64 - s)); }

inline uint64_t Mix47(uint64_t v) { return v ^ (v >> 47); }

inline uint64_t Combine(uint64_t u, uint64_t v, uint64_t mul) {
  uint64_t a = Mix47((u ^ v) * mul);
  uint64_t b = Mix47((v ^ a) * mul);
  return b * mul;
}

uint64_t Short(const uint8_t* s, uint64_t n) {  // n <= 16
  if (n >= 8) {
    const uint64_t mul = kK2 + n * 2;
    const uint64_t a = Load64(s) + kK2;
    const uint64_t b = Load64(s + n - 8);
    return Combine(Rot(b, 37) * mul + a, (Rot(a, 25) + b) * mul, mul);
  }
  if (n >= 4) {
    const uint64_t mul = kK2 + n * 2;
    return Combine(n + (Load32(s) << 3), Load32(s + n - 4), mul);
  }
  if (n > 0) {
    const uint32_t y = uint32_t{s[0]} + (uint32_t{s[n >> 1]} << 8);
    const uint32_t z = static_cast<uint32_t>(n) + (uint32_t{s[n - 1]} << 2);
    return Mix47(y * kK2 ^ z * kK0) * kK2;
  }
  return kK2;
}

uint64_t Medium(const uint8_t* s, uint64_t n) {  // 17 <= n <= 32
  const uint64_t mul = kK2 + n * 2;
  const uint64_t a = Load64(s) * kK1;
  const uint64_t b = Load64(s + 8);
  const uint64_t c = Load64(s + n - 8) * mul;
  const uint64_t d = Load64(s + n - 16) * kK2;
  return Combine(Rot(a + b, 43) + Rot(c, 30) + d, a + Rot(b + kK2, 18) + c, mul);
}

uint64_t Long(const uint8_t* s, uint64_t n) {  // 33 <= n <= 64
  const uint64_t mul = kK2 + n * 2;
  const uint64_t a = Load64(s) * kK2;
  const uint64_t b = Load64(s + 8);
  const uint64_t c = Load64(s + n - 8) * mul;
  const uint64_t d = Load64(s + n - 16) * kK2;
  const uint64_t y = Rot(a + b, 43) + Rot(c, 30) + d;
  const uint64_t z = Combine(y, a + Rot(b + kK2, 18) + c, mul);
  const uint64_t e = Load64(s + 16) * mul;
  const uint64_t f = Load64(s + 24);
  const uint64_t g = (y + Load64(s + n - 32)) * mul;
  const uint64_t h = (z + Load64(s + n - 24)) * mul;
  return Combine(Rot(e + f, 43) + Rot(g, 30) + h, e + Rot(f + a, 18) + g, mul);
}

// Mixes 32 bytes at p into the running pair (a, b).
inline Pair Chunk32(const uint8_t* p, uint64_t a, uint64_t b) {
  const uint64_t w = Load64(p), x = Load64(p + 8), y = Load64(p + 16), z = Load64(p + 24);
  a += w;
  b = Rot(b + a + z, 21);
  const uint64_t c = a;
  a += x + y;
  b += Rot(a, 44);
  return {a + z, b + c};
}

uint64_t Blocks(const uint8_t* s, uint64_t n) {  // n > 64: 64-byte blocks, then the last 64
  uint64_t x = 81;
  uint64_t y = x * kK1 + 113;
  uint64_t z = Mix47(y * kK2 + 113) * kK2;
  Pair v{0, 0}, w{0, 0};
  x = x * kK2 + Load64(s);
  const uint8_t* end = s + ((n - 1) / 64) * 64;
  const uint8_t* last = end + ((n - 1) & 63) - 63;
  do {
    x = Rot(x + y + v.first + Load64(s + 8), 37) * kK1;
    y = Rot(y + v.second + Load64(s + 48), 42) * kK1;
    x ^= w.second;
    y += v.first + Load64(s + 40);
    z = Rot(z + w.first, 33) * kK1;
    v = Chunk32(s, v.second * kK1, x + w.first);
    w = Chunk32(s + 32, z + w.second, y + Load64(s + 16));
    const uint64_t t = z;
    z = x;
    x = t;
    s += 64;
  } while (s != end);
  const uint64_t mul = kK1 + ((z & 0xff) << 1);
  s = last;
  w.first += (n - 1) & 63;
  v.first += w.first;
  w.first += v.first;
  x = Rot(x + y + v.first + Load64(s + 8), 37) * mul;
  y = Rot(y + v.second + Load64(s + 48), 42) * mul;
  x ^= w.second * 9;
  y += v.first * 9 + Load64(s + 40);
  z = Rot(z + w.first, 33) * mul;
  v = Chunk32(s, v.second * mul, x + w.first);
  w = Chunk32(s + 32, z + w.second, y + Load64(s + 16));
  return Combine(Combine(v.first, w.first, mul) + Mix47(y) * kK0 + x,
                 Combine(v.second, w.second, mul) + z, mul);
}

uint64_t Fingerprint64(const uint8_t* s, uint64_t n) {
  if (n <= 16) return Short(s, n);
  if (n <= 32) return Medium(s, n);
  if (n <= 64) return Long(s, n);
  return Blocks(s, n);
}

// Appends the UTF-8 encoding of code point c; false for surrogates and values past U+10FFFF.
inline bool PutUtf8(uint32_t c, uint8_t*& out) {
  if (c < 0x80) {
    *out++ = static_cast<uint8_t>(c);
  } else if (c < 0x800) {
    *out++ = static_cast<uint8_t>(0xC0 | (c >> 6));
    *out++ = static_cast<uint8_t>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    if (c >= 0xD800 && c < 0xE000) return false;
    *out++ = static_cast<uint8_t>(0xE0 | (c >> 12));
    *out++ = static_cast<uint8_t>(0x80 | ((c >> 6) & 0x3F));
    *out++ = static_cast<uint8_t>(0x80 | (c & 0x3F));
  } else if (c < 0x110000) {
    *out++ = static_cast<uint8_t>(0xF0 | (c >> 18));
    *out++ = static_cast<uint8_t>(0x80 | ((c >> 12) & 0x3F));
    *out++ = static_cast<uint8_t>(0x80 | ((c >> 6) & 0x3F));
    *out++ = static_cast<uint8_t>(0x80 | (c & 0x3F));
  } else {
    return false;
  }
  return true;
}

// Whether n UCS-4 characters are all NUL.
inline bool AllZero(const uint32_t* p, int64_t n) {
  uint32_t any = 0;
  for (int64_t k = 0; k < n; ++k) any |= p[k];  // no early exit: vectorised
  return any == 0;
}

// One key of any kind, as the bytes that are hashed and compared.
class KeyReader {
 public:
  KeyReader(int kind, const void* data, int64_t width) : kind_(kind), data_(data), width_(width) {
    buffer_.resize(kind == 1 ? 4 * width + 8 : 32);
  }

  // Points *bytes/*len at key i's bytes; false if a UCS-4 key has no UTF-8 encoding.
  bool Read(int64_t i, const uint8_t** bytes, uint64_t* len) {
    if (kind_ == 0) {
      const uint8_t* key = static_cast<const uint8_t*>(data_) + i * width_;
      int64_t n = width_;
      while (n > 0 && key[n - 1] == 0) --n;
      *bytes = key;
      *len = static_cast<uint64_t>(n);
      return true;
    }
    char* text = reinterpret_cast<char*>(buffer_.data());
    if (kind_ == 2) {
      const auto r = std::to_chars(text, text + 24, static_cast<const int64_t*>(data_)[i]);
      *bytes = buffer_.data();
      *len = static_cast<uint64_t>(r.ptr - text);
      return true;
    }
    const uint32_t* key = static_cast<const uint32_t*>(data_) + i * width_;
    uint8_t* end = buffer_.data();
    // The common case first: ASCII up to the first NUL, then only NULs (checked a word at a
    // time). Otherwise the key ends at its last non-NUL character and is encoded in full.
    int64_t j = 0;
    for (; j < width_ && key[j] != 0 && key[j] < 0x80; ++j) *end++ = static_cast<uint8_t>(key[j]);
    if (j == width_ || (key[j] == 0 && AllZero(key + j, width_ - j))) {
      *bytes = buffer_.data();
      *len = static_cast<uint64_t>(end - buffer_.data());
      return true;
    }
    int64_t n = width_;
    while (n > 0 && key[n - 1] == 0) --n;
    for (; j < n; ++j) {
      if (!PutUtf8(key[j], end)) return false;
    }
    *bytes = buffer_.data();
    *len = static_cast<uint64_t>(end - buffer_.data());
    return true;
  }

 private:
  int kind_;
  const void* data_;
  int64_t width_;
  std::vector<uint8_t> buffer_;
};

// Runs body(begin, end) over [0, n) in `threads` contiguous parts; returns the smallest failing
// index any part reported (body returns -1 on success), or -1.
template <typename Body>
int64_t ParallelFor(int64_t n, int threads, Body body) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n / 16384));
  if (parts == 1) return body(0, n);
  std::vector<int64_t> bad(parts, -1);
  std::vector<std::thread> pool;
  for (int64_t p = 0; p < parts; ++p) {
    pool.emplace_back([&, p] { bad[p] = body(n * p / parts, n * (p + 1) / parts); });
  }
  for (auto& t : pool) t.join();
  for (int64_t b : bad) {
    if (b >= 0) return b;
  }
  return -1;
}

inline uint64_t Mod(uint64_t h, uint64_t m) { return m == 0 ? h : h % m; }

inline uint64_t IntSlot(int64_t key) {
  return (static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ULL) ^ (static_cast<uint64_t>(key) >> 29);
}

}  // namespace

extern "C" {

#define JAXEMBED_EXPORT __attribute__((visibility("default")))

JAXEMBED_EXPORT int64_t jaxembed_hash_buckets(int kind, const void* data, int64_t n,
                                              int64_t width, uint64_t num_bins, int threads,
                                              uint64_t* out) {
  return ParallelFor(n, threads, [&](int64_t begin, int64_t end) -> int64_t {
    KeyReader reader(kind, data, width);
    const uint8_t* bytes;
    uint64_t len;
    for (int64_t i = begin; i < end; ++i) {
      if (!reader.Read(i, &bytes, &len)) return i;
      out[i] = Mod(Fingerprint64(bytes, len), num_bins);
    }
    return -1;
  });
}

// slots: 2 * (mask + 1) uint64 (mask + 1 a power of two >= 2 * num_keys), zero-filled by the
// caller; gets, at each key's probe position, the pair (key hash, row + 1): a probe reads one
// pair, and touches the key's bytes only when the hashes match. String keys are placed by their
// fingerprints (`hashes`), int64 keys (`int_keys`, hashes null) by their value itself.
JAXEMBED_EXPORT void jaxembed_vocab_slots(const uint64_t* hashes, const int64_t* int_keys,
                                          int64_t num_keys, uint64_t mask, uint64_t* slots) {
  for (int64_t r = 0; r < num_keys; ++r) {
    const uint64_t h = hashes ? hashes[r] : static_cast<uint64_t>(int_keys[r]);
    uint64_t i = (hashes ? h : IntSlot(int_keys[r])) & mask;
    while (slots[2 * i + 1] != 0) i = (i + 1) & mask;
    slots[2 * i] = h;
    slots[2 * i + 1] = static_cast<uint64_t>(r) + 1;
  }
}

// The vocabulary: string keys as one blob (key r = blob[offsets[r], offsets[r + 1])), or int64
// keys; `slots` from jaxembed_vocab_slots.
JAXEMBED_EXPORT int64_t jaxembed_vocab_lookup(int kind, const void* data, int64_t n,
                                              int64_t width, const uint8_t* blob,
                                              const int64_t* offsets, int64_t num_keys,
                                              const uint64_t* slots, uint64_t mask,
                                              uint64_t num_oov, int threads, int64_t* out) {
  // Ids go in blocks: first every id's probe start is computed and its slot prefetched, then
  // the probes run, so the cache misses of a block overlap.
  constexpr int64_t kBlock = 16;
  return ParallelFor(n, threads, [&](int64_t begin, int64_t end) -> int64_t {
    KeyReader reader(kind, data, width);
    const uint8_t* bytes;
    uint64_t len;
    uint64_t probe[kBlock];
    for (int64_t lo = begin; lo < end; lo += kBlock) {
      const int64_t hi = std::min(end, lo + kBlock);
      for (int64_t i = lo; i < hi; ++i) {
        if (kind == 2) {
          probe[i - lo] = static_cast<uint64_t>(static_cast<const int64_t*>(data)[i]);
        } else {
          if (!reader.Read(i, &bytes, &len)) return i;
          probe[i - lo] = Fingerprint64(bytes, len);
        }
        const uint64_t start =
            (kind == 2 ? IntSlot(static_cast<int64_t>(probe[i - lo])) : probe[i - lo]) & mask;
        __builtin_prefetch(slots + 2 * start);
      }
      for (int64_t i = lo; i < hi; ++i) {
        const uint64_t key = probe[i - lo];  // the int64 id, or the string's fingerprint
        int64_t row = -1;
        uint64_t s = (kind == 2 ? IntSlot(static_cast<int64_t>(key)) : key) & mask;
        for (; slots[2 * s + 1] != 0; s = (s + 1) & mask) {
          if (slots[2 * s] != key) continue;
          const int64_t r = static_cast<int64_t>(slots[2 * s + 1]) - 1;
          if (kind != 2) {  // same fingerprint: compare the bytes
            reader.Read(i, &bytes, &len);
            if (static_cast<uint64_t>(offsets[r + 1] - offsets[r]) != len ||
                std::memcmp(blob + offsets[r], bytes, len) != 0) {
              continue;
            }
          }
          row = r;
          break;
        }
        if (row < 0) {
          uint64_t h = key;
          if (kind == 2) {
            reader.Read(i, &bytes, &len);
            h = Fingerprint64(bytes, len);
          }
          row = num_keys + static_cast<int64_t>(h % num_oov);
        }
        out[i] = row;
      }
    }
    return -1;
  });
}

}  // extern "C"
