// jaxembed's CPU kernels: row gathers, row writes and TF-ordered slot sums, as XLA FFI handlers.
//
// XLA:CPU's gather and scatter run well below memory speed on the row-shaped access of an
// embedding lookup (one 64-float row per index). These handlers move whole rows with memcpy and
// sum slots with vectorised loops over the row, in exactly the order the pure-JAX path (and TF's
// CPU kernels) use, so results are bit-identical to it. Work is split over XLA's intra-op thread
// pool. Built with -ffp-contract=off: a product w * e is rounded before it is added, as in TF.
// The hot loops are also compiled for AVX2 and AVX-512 (see "Row arithmetic" below).
//
// Handlers (see jaxembed/_kernels.py for the JAX side):
//   jaxembed_gather_rows    out[i] = table[ids[i]], a zero row where ids[i] is out of range
//   jaxembed_scatter_rows   table[ids[i]] = rows[i] in place (output aliases the table)
//   jaxembed_combine        out[r] = ordered sum of (w *) rows[slot] over a row's head slots,
//                           then blocks of 8 slots summed and added in turn; rows may be read
//                           through ids (table[ids[slot]]) to skip the gathered copy
//   jaxembed_combine_grad   the transpose of jaxembed_combine: grads[slot] += (w *) cot[r]
//   jaxembed_apply_rows     TF's optimizer rules (and FBGEMM's row-wise ones) on rows ids[i] of
//                           the table and its slots, in place, with given row gradients
//   jaxembed_apply_slots    the same, with the row gradients taken from slots and cotangents

#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#if defined(__SSE__)
#include <immintrin.h>
#endif
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------------------------
// Parallel loop over [0, n) in chunks, on XLA's intra-op pool plus the calling thread.
//
// Helpers claim chunks from a shared counter and the caller claims them too, so the caller only
// ever waits for chunks that a running thread has already claimed: a busy pool (e.g. several
// handlers running at once) cannot deadlock it, the caller then simply does the work itself.

struct LoopState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename F>
void RunChunks(LoopState& s, int64_t n, int64_t grain, int64_t chunks, const F& body) {
  for (;;) {
    int64_t c = s.next.fetch_add(1);
    if (c >= chunks) return;
    body(c * grain, std::min(n, (c + 1) * grain));
    if (s.done.fetch_add(1) + 1 == chunks) {
      std::lock_guard<std::mutex> lock(s.mu);
      s.cv.notify_all();
    }
  }
}

template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, F body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (helpers <= 0) {
    body(0, n);
    return;
  }
  auto state = std::make_shared<LoopState>();
  auto shared_body = std::make_shared<F>(std::move(body));
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([state, shared_body, n, grain, chunks] {
      RunChunks(*state, n, grain, chunks, *shared_body);
    });
  }
  RunChunks(*state, n, grain, chunks, *shared_body);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == chunks; });
}

// Chunks of about 64 KiB of row data: big enough to amortise scheduling, small enough to balance.
int64_t RowGrain(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1));
}

int64_t RowsOf(const ffi::AnyBuffer& b) {
  auto dims = b.dimensions();
  return dims.size() == 0 ? 1 : dims[0];
}

// Elements per row: the product of all but the leading dimension.
int64_t RowElements(const ffi::AnyBuffer& b) {
  auto dims = b.dimensions();
  int64_t n = 1;
  for (size_t i = 1; i < dims.size(); ++i) n *= dims[i];
  return n;
}

// Index i of an int32 or int64 buffer.
struct Indices {
  const void* data;
  bool wide;
  int64_t operator[](int64_t i) const {
    return wide ? static_cast<const int64_t*>(data)[i] : static_cast<const int32_t*>(data)[i];
  }
};

ffi::Error AsIndices(const ffi::AnyBuffer& b, Indices* out) {
  switch (b.element_type()) {
    case ffi::DataType::S32:
      *out = Indices{b.untyped_data(), false};
      return ffi::Error::Success();
    case ffi::DataType::S64:
      *out = Indices{b.untyped_data(), true};
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("row ids must be int32 or int64");
  }
}

// Random rows come from DRAM: asking for the row kAhead positions on while copying this one
// keeps several misses in flight instead of one.
constexpr int64_t kAhead = 8;

inline void Prefetch(const char* base, int64_t r, int64_t num_rows, int64_t row_bytes,
                     bool write) {
  if (r < 0 || r >= num_rows) return;
  const char* p = base + r * row_bytes;
  for (int64_t off = 0; off < row_bytes; off += 64) {
    if (write) {
      __builtin_prefetch(p + off, 1);
    } else {
      __builtin_prefetch(p + off, 0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row gather and row write (any element type: rows are copied as bytes).

ffi::Error GatherRows(ffi::ThreadPool pool, ffi::AnyBuffer table, ffi::AnyBuffer ids,
                      ffi::Result<ffi::AnyBuffer> out) {
  Indices index;
  if (ffi::Error e = AsIndices(ids, &index); e.failure()) return e;
  const int64_t num_rows = RowsOf(table);
  const int64_t n = static_cast<int64_t>(ids.element_count());
  const int64_t row_bytes = static_cast<int64_t>(ByteWidth(table.element_type())) *
                            RowElements(table);
  if (out->size_bytes() != static_cast<size_t>(n * row_bytes)) {
    return ffi::Error::InvalidArgument("gather_rows: output size does not match ids x row");
  }
  const char* src = static_cast<const char*>(table.untyped_data());
  char* dst = static_cast<char*>(out->untyped_data());
  ParallelFor(pool, n, RowGrain(row_bytes), [=](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kAhead < hi) Prefetch(src, index[i + kAhead], num_rows, row_bytes, false);
      const int64_t r = index[i];
      if (r >= 0 && r < num_rows) {
        std::memcpy(dst + i * row_bytes, src + r * row_bytes, row_bytes);
      } else {
        std::memset(dst + i * row_bytes, 0, row_bytes);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error ScatterRows(ffi::ThreadPool pool, ffi::AnyBuffer table, ffi::AnyBuffer ids,
                       ffi::AnyBuffer rows, ffi::Result<ffi::AnyBuffer> out) {
  Indices index;
  if (ffi::Error e = AsIndices(ids, &index); e.failure()) return e;
  const int64_t num_rows = RowsOf(table);
  const int64_t n = static_cast<int64_t>(ids.element_count());
  const int64_t row_bytes = static_cast<int64_t>(ByteWidth(table.element_type())) *
                            RowElements(table);
  if (rows.size_bytes() != static_cast<size_t>(n * row_bytes) ||
      rows.element_type() != table.element_type()) {
    return ffi::Error::InvalidArgument("scatter_rows: rows must be [len(ids), row] of table type");
  }
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != table.untyped_data()) {  // not aliased after all: start from a copy of the table
    std::memcpy(dst, table.untyped_data(), table.size_bytes());
  }
  const char* src = static_cast<const char*>(rows.untyped_data());
  // Ids are distinct (or out of range, and skipped), so chunks never write the same row.
  ParallelFor(pool, n, RowGrain(row_bytes), [=](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kAhead < hi) Prefetch(dst, index[i + kAhead], num_rows, row_bytes, true);
      const int64_t r = index[i];
      if (r >= 0 && r < num_rows) std::memcpy(dst + r * row_bytes, src + i * row_bytes, row_bytes);
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// TF-ordered slot sums (float32).
//
// A combined output row r is the sum, strictly left to right, of its H head slots; then each of
// its T blocks of 8 slots is summed left to right and added to the running total. A slot holds a
// row number p; p outside [0, N) is an empty slot (the pure-JAX path adds a zero row there, which
// changes nothing). Row p is rows[p], or, when `ids` is given, table[ids[p]] (an id outside the
// table is an empty slot too): the lookup then reads the table directly, with no gathered copy.

constexpr int64_t kBlock = 8;

struct Slots {
  const int32_t* head;    // [R, H]
  const float* head_w;    // [R, H] or null (all 1)
  const int32_t* blocks;  // [R, T, 8]
  const float* block_w;   // [R, T, 8] or null
  int64_t num_out, h, t;

  int64_t per_row() const { return h + t * kBlock; }
  // Slot k of output row r, in summation order: head slots, then the blocks' slots.
  int32_t slot(int64_t r, int64_t k) const {
    return k < h ? head[r * h + k] : blocks[r * t * kBlock + (k - h)];
  }
  float weight(int64_t r, int64_t k) const {
    if (head_w == nullptr) return 1.0f;
    return k < h ? head_w[r * h + k] : block_w[r * t * kBlock + (k - h)];
  }
};

ffi::Error AsSlots(ffi::Buffer<ffi::S32> head, ffi::Buffer<ffi::F32> head_w,
                   ffi::Buffer<ffi::S32> blocks, ffi::Buffer<ffi::F32> block_w, Slots* out) {
  auto hd = head.dimensions();
  auto bd = blocks.dimensions();
  if (hd.size() != 2 || bd.size() != 3 || bd[0] != hd[0] || bd[2] != kBlock) {
    return ffi::Error::InvalidArgument("slots must be [R, H] and [R, T, 8]");
  }
  // Unweighted slots come with empty weight arrays (a weighted [R, 0] head has none either).
  const bool weighted = head_w.element_count() + block_w.element_count() != 0;
  if (weighted && (head_w.element_count() != head.element_count() ||
                   block_w.element_count() != blocks.element_count())) {
    return ffi::Error::InvalidArgument("slot weights must match the slots' shapes");
  }
  *out = Slots{head.typed_data(),   weighted ? head_w.typed_data() : nullptr,
               blocks.typed_data(), weighted ? block_w.typed_data() : nullptr,
               hd[0],               hd[1],
               bd[1]};
  return ffi::Error::Success();
}

// Where slot rows come from: rows[p], or table[ids[p]].
struct RowSource {
  const float* data;
  int64_t num_rows;  // rows in `data`
  Indices ids;       // valid when indirect
  int64_t num_slots_rows;  // valid slot values: [0, num_slots_rows)
  bool indirect;
  int64_t d;

  const float* row(int64_t p) const {
    if (p < 0 || p >= num_slots_rows) return nullptr;
    if (!indirect) return data + p * d;
    const int64_t r = ids[p];
    return (r >= 0 && r < num_rows) ? data + r * d : nullptr;
  }
};

// ---------------------------------------------------------------------------------------------
// Row arithmetic in vectors of 8 floats.
//
// Rows are summed lane by lane in GCC vector types: a vector add or multiply rounds every lane
// exactly as the scalar operation does, so sums keep their bits, and an accumulator of D = 8 kV
// floats stays in kV registers for a whole sum instead of going through memory for every row.
// The loops that use them are compiled for AVX-512, AVX2 and the x86-64 baseline (JAXEMBED_SIMD:
// target_clones), the best one picked when the library loads.

#define JAXEMBED_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define JAXEMBED_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define JAXEMBED_SIMD
#endif

constexpr int64_t kLanes = 8;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));

JAXEMBED_INLINE const Vec& VecAt(const float* p) { return *reinterpret_cast<const Vec*>(p); }
JAXEMBED_INLINE Vec& VecAt(float* p) { return *reinterpret_cast<Vec*>(p); }

JAXEMBED_INLINE void AddRow(float* __restrict acc, const float* __restrict e, int64_t d) {
  for (int64_t k = 0; k < d; ++k) acc[k] += e[k];
}

JAXEMBED_INLINE void AddScaledRow(float* __restrict acc, const float* __restrict e, float w,
                                  int64_t d) {
  for (int64_t k = 0; k < d; ++k) acc[k] += w * e[k];
}

// A row accumulator: D = 8 kV floats in kV vector registers, or (kV = 0) any D in memory.
template <int kV>
struct RowAcc {
  Vec v[kV];
  explicit RowAcc(int64_t /*d*/) {}
  JAXEMBED_INLINE void Zero() {
    for (int i = 0; i < kV; ++i) v[i] = Vec{};
  }
  JAXEMBED_INLINE void Add(const float* e) {
    for (int i = 0; i < kV; ++i) v[i] += VecAt(e + i * kLanes);
  }
  JAXEMBED_INLINE void AddScaled(const float* e, float w) {
    for (int i = 0; i < kV; ++i) v[i] += w * VecAt(e + i * kLanes);
  }
  JAXEMBED_INLINE void Add(const RowAcc& o) {
    for (int i = 0; i < kV; ++i) v[i] += o.v[i];
  }
  JAXEMBED_INLINE void Store(float* out) const {
    for (int i = 0; i < kV; ++i) VecAt(out + i * kLanes) = v[i];
  }
};

template <>
struct RowAcc<0> {
  std::vector<float> v;
  explicit RowAcc(int64_t d) : v(d) {}
  JAXEMBED_INLINE void Zero() { std::fill(v.begin(), v.end(), 0.0f); }
  JAXEMBED_INLINE void Add(const float* e) { AddRow(v.data(), e, Size()); }
  JAXEMBED_INLINE void AddScaled(const float* e, float w) { AddScaledRow(v.data(), e, w, Size()); }
  JAXEMBED_INLINE void Add(const RowAcc& o) { AddRow(v.data(), o.v.data(), Size()); }
  JAXEMBED_INLINE void Store(float* out) const { std::copy(v.begin(), v.end(), out); }
  JAXEMBED_INLINE int64_t Size() const { return static_cast<int64_t>(v.size()); }
};

// Calls body.template Run<kV>() with the register accumulator for rows of d floats, if there
// is one (d = 8, 16, 32 or 64), else with kV = 0.
template <typename Body>
JAXEMBED_INLINE void WithRowWidth(int64_t d, Body& body) {
  switch (d) {
    case 8:
      return body.template Run<1>();
    case 16:
      return body.template Run<2>();
    case 32:
      return body.template Run<4>();
    case 64:
      return body.template Run<8>();
    default:
      return body.template Run<0>();
  }
}

JAXEMBED_INLINE void PrefetchRead(const float* row, int64_t d) {
  for (int64_t off = 0; off < d; off += 16) __builtin_prefetch(row + off);
}

// ---------------------------------------------------------------------------------------------
// Combine: a chunk of output rows at a time, in two passes.
//
// The first pass resolves the chunk's slots to row pointers (skipping empty slots) and counts
// how many fall in each row's head and in each of its blocks; the second sums them, prefetching
// the row kAheadRows non-empty slots on. Prefetching along the resolved list, across output
// rows, keeps misses in flight at the start of every row too (about 20 ids per example: a
// per-row look-ahead of 8 leaves the first 8 of each row unprefetched).

constexpr int64_t kAheadRows = 16;

struct Resolved {
  std::vector<const float*> rows;  // the non-empty slots' rows, in summation order
  std::vector<float> weights;      // their weights (weighted slots only)
  std::vector<int32_t> counts;     // [output rows, 1 + T]: non-empty slots per head and block
};

// Resolve with row_of(p): the row a slot value p reads, or null.
template <typename RowOf>
void ResolveWith(const Slots& s, RowOf row_of, int64_t lo, int64_t hi, Resolved* out) {
  const int64_t h = s.h, t = s.t, segments = 1 + t;
  const bool weighted = s.head_w != nullptr;
  out->rows.resize((hi - lo) * s.per_row());
  if (weighted) out->weights.resize(out->rows.size());
  out->counts.assign((hi - lo) * segments, 0);
  const float** rows = out->rows.data();
  float* weights = out->weights.data();
  int32_t* count = out->counts.data();
  int64_t n = 0;
  for (int64_t r = lo; r < hi; ++r, count += segments) {
    for (int64_t k = 0; k < h; ++k) {
      const float* e = row_of(s.head[r * h + k]);
      if (e == nullptr) continue;
      if (weighted) weights[n] = s.head_w[r * h + k];
      rows[n++] = e;
      ++count[0];
    }
    for (int64_t k = 0; k < t * kBlock; ++k) {
      const int64_t at = r * t * kBlock + k;
      const float* e = row_of(s.blocks[at]);
      if (e == nullptr) continue;
      if (weighted) weights[n] = s.block_w[at];
      rows[n++] = e;
      ++count[1 + k / kBlock];
    }
  }
  out->rows.resize(n);
}

void Resolve(const Slots& s, const RowSource& src, int64_t lo, int64_t hi, Resolved* out) {
  const float* data = src.data;
  const int64_t d = src.d, num_rows = src.num_rows, num_slot_rows = src.num_slots_rows;
  auto inside = [](int64_t i, int64_t n) {
    return static_cast<uint64_t>(i) < static_cast<uint64_t>(n);
  };
  if (!src.indirect) {
    ResolveWith(s, [&](int64_t p) { return inside(p, num_rows) ? data + p * d : nullptr; }, lo, hi,
                out);
    return;
  }
  auto via = [&](auto* ids) {
    ResolveWith(
        s,
        [&](int64_t p) -> const float* {
          if (!inside(p, num_slot_rows)) return nullptr;
          const int64_t r = ids[p];
          return inside(r, num_rows) ? data + r * d : nullptr;
        },
        lo, hi, out);
  };
  if (src.ids.wide) {
    via(static_cast<const int64_t*>(src.ids.data));
  } else {
    via(static_cast<const int32_t*>(src.ids.data));
  }
}

struct SumResolved {
  const Resolved& res;
  int64_t t, d;
  bool weighted;
  float* out;  // [output rows of the chunk, D]

  template <int kV>
  JAXEMBED_INLINE void Run() const {
    if (weighted) {
      Sum<kV, true>();
    } else {
      Sum<kV, false>();
    }
  }

  template <int kV, bool kWeighted>
  JAXEMBED_INLINE void Sum() const {
    const float* const* rows = res.rows.data();
    const float* weights = res.weights.data();
    const int64_t n = static_cast<int64_t>(res.rows.size());
    for (int64_t j = 0; j < std::min(n, kAheadRows); ++j) PrefetchRead(rows[j], d);
    const int32_t* count = res.counts.data();
    const int64_t num_out = static_cast<int64_t>(res.counts.size()) / (1 + t);
    RowAcc<kV> acc(d), block(d);
    int64_t j = 0;
    for (int64_t r = 0; r < num_out; ++r) {
      acc.Zero();
      j = AddNext<kV, kWeighted>(acc, rows, weights, j, *count++, n);
      for (int64_t b = 0; b < t; ++b) {
        block.Zero();
        j = AddNext<kV, kWeighted>(block, rows, weights, j, *count++, n);
        acc.Add(block);
      }
      acc.Store(out + r * d);
    }
  }

  // Adds rows [j, j + count) of the list to acc, in order; returns j + count.
  template <int kV, bool kWeighted>
  JAXEMBED_INLINE int64_t AddNext(RowAcc<kV>& acc, const float* const* rows,
                                  const float* weights, int64_t j, int64_t count,
                                  int64_t n) const {
    for (const int64_t end = j + count; j < end; ++j) {
      if (j + kAheadRows < n) PrefetchRead(rows[j + kAheadRows], d);
      if (kWeighted) {
        acc.AddScaled(rows[j], weights[j]);
      } else {
        acc.Add(rows[j]);
      }
    }
    return j;
  }
};

JAXEMBED_SIMD void SumChunk(const Resolved& res, int64_t t, int64_t d, bool weighted, float* out) {
  SumResolved body{res, t, d, weighted, out};
  WithRowWidth(d, body);
}

// table: [V, D] float32; ids: [N] int32/int64, or empty (slots index table rows directly).
ffi::Error Combine(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::AnyBuffer ids,
                   ffi::Buffer<ffi::S32> head, ffi::Buffer<ffi::F32> head_w,
                   ffi::Buffer<ffi::S32> blocks, ffi::Buffer<ffi::F32> block_w,
                   ffi::ResultBuffer<ffi::F32> out) {
  Slots s;
  if (ffi::Error e = AsSlots(head, head_w, blocks, block_w, &s); e.failure()) return e;
  auto td = table.dimensions();
  if (td.size() != 2) return ffi::Error::InvalidArgument("combine: rows must be [N, D]");
  RowSource src{table.typed_data(), td[0], Indices{nullptr, false}, td[0], false, td[1]};
  if (ids.element_count() != 0) {
    if (ffi::Error e = AsIndices(ids, &src.ids); e.failure()) return e;
    src.indirect = true;
    src.num_slots_rows = static_cast<int64_t>(ids.element_count());
  }
  const int64_t d = src.d;
  if (out->element_count() != static_cast<size_t>(s.num_out * d)) {
    return ffi::Error::InvalidArgument("combine: output must be [R, D]");
  }
  float* dst = out->typed_data();
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, s.per_row()));
  ParallelFor(pool, s.num_out, grain, [=](int64_t lo, int64_t hi) {
    Resolved res;
    Resolve(s, src, lo, hi, &res);
    SumChunk(res, s.t, d, s.head_w != nullptr, dst + lo * d);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Transposed slot sums: grads[p] = sum over the slots holding p of (w *) cot[r].
//
// The slots are first bucketed by row p (a counting sort that keeps slot order), then every row
// sums its uses in that order. Rows are independent, so they split over threads with no atomics,
// and the result does not depend on the thread count.

struct Uses {
  std::vector<int64_t> start;  // [num_rows + 1]
  std::vector<int32_t> out_row;  // the output row r of each use, grouped by p
  std::vector<float> weight;     // its weight (weighted slots only)
};

Uses BucketSlots(const Slots& s, int64_t num_rows) {
  Uses u;
  u.start.assign(num_rows + 1, 0);
  const int64_t k_max = s.per_row();
  for (int64_t r = 0; r < s.num_out; ++r) {
    for (int64_t k = 0; k < k_max; ++k) {
      const int64_t p = s.slot(r, k);
      if (p >= 0 && p < num_rows) ++u.start[p + 1];
    }
  }
  for (int64_t p = 0; p < num_rows; ++p) u.start[p + 1] += u.start[p];
  const int64_t total = u.start[num_rows];
  u.out_row.resize(total);
  if (s.head_w != nullptr) u.weight.resize(total);
  std::vector<int64_t> cursor(u.start.begin(), u.start.end() - 1);
  for (int64_t r = 0; r < s.num_out; ++r) {
    for (int64_t k = 0; k < k_max; ++k) {
      const int64_t p = s.slot(r, k);
      if (p < 0 || p >= num_rows) continue;
      const int64_t at = cursor[p]++;
      u.out_row[at] = static_cast<int32_t>(r);
      if (s.head_w != nullptr) u.weight[at] = s.weight(r, k);
    }
  }
  return u;
}

// Row gradients from the uses: g = the sum of row p's uses, in bucket (slot) order.
struct UseSums {
  const Uses& uses;
  const float* cot;  // [R, D]
  int64_t d;

  // g[p] (rows p0 + i of g) for p in [p0, p1).
  template <int kV>
  JAXEMBED_INLINE void Sum(int64_t p0, int64_t p1, float* g) const {
    const bool weighted = !uses.weight.empty();
    RowAcc<kV> acc(d);
    for (int64_t p = p0; p < p1; ++p) {
      acc.Zero();
      for (int64_t e = uses.start[p]; e < uses.start[p + 1]; ++e) {
        const float* c = cot + static_cast<int64_t>(uses.out_row[e]) * d;
        if (weighted) {
          acc.AddScaled(c, uses.weight[e]);
        } else {
          acc.Add(c);
        }
      }
      acc.Store(g + (p - p0) * d);
    }
  }
};

struct UseSumsChunk {
  const UseSums& sums;
  int64_t p0, p1;
  float* g;
  template <int kV>
  JAXEMBED_INLINE void Run() const {
    sums.Sum<kV>(p0, p1, g);
  }
};

JAXEMBED_SIMD void SumUses(const UseSums& sums, int64_t p0, int64_t p1, float* g) {
  UseSumsChunk body{sums, p0, p1, g};
  WithRowWidth(sums.d, body);
}

ffi::Error CombineGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> cot,
                       ffi::Buffer<ffi::S32> head, ffi::Buffer<ffi::F32> head_w,
                       ffi::Buffer<ffi::S32> blocks, ffi::Buffer<ffi::F32> block_w,
                       ffi::ResultBuffer<ffi::F32> grads) {
  Slots s;
  if (ffi::Error e = AsSlots(head, head_w, blocks, block_w, &s); e.failure()) return e;
  auto cd = cot.dimensions();
  auto gd = grads->dimensions();
  if (cd.size() != 2 || gd.size() != 2 || cd[0] != s.num_out || cd[1] != gd[1]) {
    return ffi::Error::InvalidArgument("combine_grad: cot must be [R, D] and grads [N, D]");
  }
  const int64_t num_rows = gd[0], d = gd[1];
  const Uses uses = BucketSlots(s, num_rows);
  const float* c = cot.typed_data();
  float* dst = grads->typed_data();
  const UseSums sums{uses, c, d};
  ParallelFor(pool, num_rows, RowGrain(d * 4 * 4), [&](int64_t lo, int64_t hi) {
    SumUses(sums, lo, hi, dst + lo * d);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// TF's TPU embedding optimizers, in place on the touched rows (float32).
//
// Each rule mirrors jaxembed/optimizers.py operation for operation (same association, constants
// rounded to float32 the same way), so the kernel and the pure-JAX update agree to the last
// bit wherever XLA computes sqrt and pow exactly as the C library does.

// Kinds and flags come from jaxembed/_kernel_abi.py, the one table both sides read (setup.py
// passes them as -D definitions).
#ifndef JAXEMBED_KIND_SGD
#error "build with setup.py: the optimizer kinds and flags come from jaxembed/_kernel_abi.py"
#endif

enum OptimizerKind : int32_t {
  kSgd = JAXEMBED_KIND_SGD,
  kAdagrad = JAXEMBED_KIND_ADAGRAD,
  kAdagradMomentum = JAXEMBED_KIND_ADAGRAD_MOMENTUM,
  kAdam = JAXEMBED_KIND_ADAM,
  kFtrl = JAXEMBED_KIND_FTRL,
  kRowWiseAdagrad = JAXEMBED_KIND_ROWWISE_ADAGRAD,
  kPartialRowWiseAdam = JAXEMBED_KIND_PARTIAL_ROWWISE_ADAM,
};

inline bool RowWise(int32_t kind) { return kind == kRowWiseAdagrad || kind == kPartialRowWiseAdam; }

enum Flags : int32_t {
  kClipGradMin = JAXEMBED_FLAG_CLIP_GRAD_MIN,
  kClipGradMax = JAXEMBED_FLAG_CLIP_GRAD_MAX,
  kWeightDecay = JAXEMBED_FLAG_WEIGHT_DECAY,
  kDecayTimesLr = JAXEMBED_FLAG_DECAY_TIMES_LR,
  kClipWeightMin = JAXEMBED_FLAG_CLIP_WEIGHT_MIN,
  kClipWeightMax = JAXEMBED_FLAG_CLIP_WEIGHT_MAX,
  kNesterov = JAXEMBED_FLAG_NESTEROV,
  kPlainAccumulator = JAXEMBED_FLAG_PLAIN_ACCUMULATOR,
  kSumInsideSqrt = JAXEMBED_FLAG_SUM_INSIDE_SQRT,
  kLinearTimesLr = JAXEMBED_FLAG_LINEAR_TIMES_LR,
  kRowDecayL2 = JAXEMBED_FLAG_ROW_DECAY_L2,
  kRowDecayDecoupled = JAXEMBED_FLAG_ROW_DECAY_DECOUPLED,
};

// hyper: clip_grad_min, clip_grad_max, weight_decay, clip_weight_min, clip_weight_max, then the
// optimizer's own constants p[0..] (see _kernel_config in jaxembed/_kernels.py).
constexpr int kHyperCommon = 5;

inline float Clip(float x, bool has_lo, float lo, bool has_hi, float hi) {
  if (has_lo) x = x < lo ? lo : x;
  if (has_hi) x = x > hi ? hi : x;
  return x;
}

// x^e; x^0.5 (FTRL's default learning_rate_power of -0.5) as a square root: correctly
// rounded, where powf is not always, and several times faster.
inline float Pow(float x, float e) { return e == 0.5f ? std::sqrt(x) : std::pow(x, e); }

struct Rule {
  int32_t kind, flags;
  const float* h;  // hyper
  float lr;
  // Partial row-wise Adam's bias corrections 1 - beta_1^t and 1 - beta_2^t (the scalars
  // operand after the learning rate; computed in JAX, as the pure path does).
  float bias1 = 1.0f, bias2 = 1.0f;

  // One element: weight w, slots a (slot 0) and b (slot 1), gradient g.
  inline void operator()(float& w, float* a, float* b, float g) const {
    const float* p = h + kHyperCommon;
    g = Clip(g, flags & kClipGradMin, h[0], flags & kClipGradMax, h[1]);
    const float w0 = w;
    float nw;
    switch (kind) {
      case kSgd:
        nw = w0 - lr * g;
        break;
      case kAdagrad: {
        const float acc = *a + g * g;
        nw = w0 - lr * g / std::sqrt(acc);
        *a = acc;
        break;
      }
      case kAdagradMomentum: {
        float acc = *a;
        acc = (flags & kPlainAccumulator) ? acc + g * g : p[0] * acc + p[1] * g * g;
        const float scaled = g * std::pow(acc + p[2], p[3]);
        const float mom = p[4] * *b + scaled;
        const float step = (flags & kNesterov) ? p[4] * mom + scaled : mom;
        nw = w0 - lr * step;
        *a = acc;
        *b = mom;
        break;
      }
      case kAdam: {
        const float m = p[0] * *a + p[1] * g;
        const float v = p[2] * *b + p[3] * g * g;
        const float denom = (flags & kSumInsideSqrt) ? std::sqrt(v + p[5]) : std::sqrt(v) + p[4];
        nw = w0 - lr * m / denom;
        *a = m;
        *b = v;
        break;
      }
      default: {  // kFtrl: p = power, l1, l2, beta, 2 * l2
        const float acc = *a, new_acc = acc + g * g;
        const float new_pow = Pow(new_acc, p[0]);
        const float delta = new_pow - Pow(acc, p[0]);
        float lin = *b;
        if (flags & kLinearTimesLr) {
          lin = lin + lr * g - delta * w0;
          const float bound = lr * p[1];
          nw = (Clip(lin, true, -bound, true, bound) - lin) / (new_pow + 2.0f * lr * p[2] + p[3]);
        } else {
          lin = lin + g - delta * w0 / lr;
          nw = (Clip(lin, true, -p[1], true, p[1]) - lin) / ((new_pow + p[3]) / lr + p[4]);
        }
        *a = new_acc;
        *b = lin;
        break;
      }
    }
    if (flags & kWeightDecay) {
      const float decay = (flags & kDecayTimesLr) ? h[2] * lr : h[2];
      nw = nw - decay * w0;
    }
    w = Clip(nw, flags & kClipWeightMin, h[3], flags & kClipWeightMax, h[4]);
  }
};

// FBGEMM's row-wise rules on one row (p = the rule's own constants after kHyperCommon):
//   kRowWiseAdagrad (EXACT_ROWWISE_ADAGRAD), p = epsilon, weight_decay; slot 0 = [V]:
//     acc += sum(g'^2) / D (g' = g + wd * w under kRowDecayL2); mult = lr / (sqrt(acc) + eps);
//     w = corr * w - mult * g, corr = 1 - mult * wd (L2) | 1 - lr * wd (decoupled) | 1
//   kPartialRowWiseAdam (PARTIAL_ROWWISE_ADAM), p = beta_1, 1 - beta_1, beta_2, 1 - beta_2,
//     epsilon, weight_decay; slot 0 = momenta [V, D], slot 1 = velocities [V]:
//     v = sum(g^2) / D * (1 - beta_2) + v * beta_2; m = beta_1 * m + (1 - beta_1) * g;
//     w -= lr * (m / bias1 / (sqrt(v / bias2) + eps) + wd * w)
// The same operations, in the same order, as RowWiseAdagrad / PartialRowWiseAdam in
// jaxembed/optimizers.py (the row sum is sequential here, a tree in XLA: equal to rounding).
JAXEMBED_INLINE void RowWiseRule(const Rule& rule, float* w, float* a, float* b,
                                 const float* g, int64_t d) {
  const float* p = rule.h + kHyperCommon;
  const float n = static_cast<float>(d);
  if (rule.kind == kRowWiseAdagrad) {
    const float eps = p[0], wd = p[1];
    const bool l2 = rule.flags & kRowDecayL2;
    float squares = 0.0f;
    for (int64_t k = 0; k < d; ++k) {
      const float gk = l2 ? g[k] + wd * w[k] : g[k];
      squares += gk * gk;
    }
    const float acc = *a + squares / n;
    *a = acc;
    const float mult = rule.lr / (std::sqrt(acc) + eps);
    if (l2) {
      const float corr = 1.0f - mult * wd;
      for (int64_t k = 0; k < d; ++k) w[k] = corr * w[k] - mult * g[k];
    } else if (rule.flags & kRowDecayDecoupled) {
      const float corr = 1.0f - rule.lr * wd;
      for (int64_t k = 0; k < d; ++k) w[k] = corr * w[k] - mult * g[k];
    } else {
      for (int64_t k = 0; k < d; ++k) w[k] = w[k] - mult * g[k];
    }
    return;
  }
  // kPartialRowWiseAdam: a = momenta (D floats), b = velocities (one float).
  float squares = 0.0f;
  for (int64_t k = 0; k < d; ++k) squares += g[k] * g[k];
  const float v = squares / n * p[3] + *b * p[2];
  *b = v;
  const float denom = std::sqrt(v / rule.bias2) + p[4];
  const float wd = p[5];
  for (int64_t k = 0; k < d; ++k) {
    const float m = p[0] * a[k] + p[1] * g[k];
    a[k] = m;
    float update = m / rule.bias1 / denom;
    if (wd != 0.0f) update = update + wd * w[k];
    w[k] = w[k] - rule.lr * update;
  }
}

// Arrays updated in place: the table [V, D] and up to two slots, float32: [V, D], or [V] (one
// value per row) for FBGEMM's row-wise slots.
struct Params {
  float* table;
  float* slot[2];
  int64_t width[2];  // floats per row of each slot: D, or 1 for a [V] slot
  int64_t num_rows, d;
};

// How many slots a kind has, and which of them hold one value per row.
size_t SlotCount(int32_t kind) {
  switch (kind) {
    case kSgd:
      return 0;
    case kAdagrad:
    case kRowWiseAdagrad:
      return 1;
    default:
      return 2;
  }
}

bool RowSlot(int32_t kind, size_t slot) {
  return (kind == kRowWiseAdagrad && slot == 0) || (kind == kPartialRowWiseAdam && slot == 1);
}

// The table and its slots of an update whose rows are `d` floats wide. A table stored several
// rows to a row ([R, p * d], as on TPU meshes) is the same row-major memory as [p * R, d].
ffi::Error AsParams(ffi::RemainingArgs args, ffi::RemainingRets rets, int32_t kind, int64_t d,
                    Params* out) {
  const size_t want = 1 + SlotCount(kind);
  if (args.size() != want || rets.size() != want) {
    return ffi::Error::InvalidArgument("apply: expected the table and its slots, in and out");
  }
  *out = Params{nullptr, {nullptr, nullptr}, {0, 0}, 0, 0};
  int64_t stored = 0;  // the table's stored row width
  for (size_t i = 0; i < want; ++i) {
    auto in = args.get<ffi::Buffer<ffi::F32>>(i);
    auto res = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (in.has_error()) return in.error();
    if (res.has_error()) return res.error();
    auto dims = in->dimensions();
    const bool row_slot = i > 0 && RowSlot(kind, i - 1);
    if (row_slot) {
      if (dims.size() != 1 || dims[0] != out->num_rows) {
        return ffi::Error::InvalidArgument("apply: row-wise slots must be [V]");
      }
      out->width[i - 1] = 1;
    } else if (dims.size() != 2) {
      return ffi::Error::InvalidArgument("apply: arrays must be [V, D]");
    } else if (i == 0) {
      if (d <= 0 || dims[1] % d != 0) {
        return ffi::Error::InvalidArgument("apply: the table's rows must hold whole rows of D");
      }
      stored = dims[1];
      out->num_rows = dims[0] * (stored / d);
      out->d = d;
    } else if (dims[0] * (stored / d) != out->num_rows || dims[1] != stored) {
      return ffi::Error::InvalidArgument("apply: slots must have the table's shape");
    } else {
      out->width[i - 1] = out->d;
    }
    float* dst = (*res)->typed_data();
    if (dst != in->typed_data()) {  // not aliased after all: start from a copy
      std::memcpy(dst, in->typed_data(), in->size_bytes());
    }
    (i == 0 ? out->table : out->slot[i - 1]) = dst;
  }
  return ffi::Error::Success();
}

// The per-element rule over a row (any kind but the row-wise ones).
void ElementRule(const Rule& rule, float* w, float* a, float* b, const float* g, int64_t d) {
  float unused = 0.0f;
  for (int64_t k = 0; k < d; ++k) {
    rule(w[k], a ? a + k : &unused, b ? b + k : &unused, g[k]);
  }
}

// Lane-wise square root. GCC vectorises std::sqrt only without errno (-fno-math-errno), so on
// x86-64 this calls SSE's square root, which rounds correctly as std::sqrt does.
JAXEMBED_INLINE void SqrtLanes(Vec& x) {
#if defined(__SSE__)
  __m128 half[2];
  std::memcpy(half, &x, sizeof(x));
  half[0] = _mm_sqrt_ps(half[0]);
  half[1] = _mm_sqrt_ps(half[1]);
  std::memcpy(&x, half, sizeof(x));
#else
  for (int64_t i = 0; i < kLanes; ++i) x[i] = std::sqrt(x[i]);
#endif
}

// SGD and Adagrad without clipping or decay (the common cases) in vectors of 8 floats: the
// same operations as Rule, lane by lane. Returns false (nothing done) for any other rule.
JAXEMBED_INLINE bool VectorRule(const Rule& rule, float* w, float* a, const float* g, int64_t d) {
  if (rule.flags != 0 || d % kLanes != 0 || (rule.kind != kSgd && rule.kind != kAdagrad)) {
    return false;
  }
  for (int64_t k = 0; k < d; k += kLanes) {
    const Vec gk = VecAt(g + k);
    if (rule.kind == kSgd) {
      VecAt(w + k) = VecAt(w + k) - rule.lr * gk;
    } else {
      const Vec acc = VecAt(a + k) + gk * gk;
      Vec root = acc;
      SqrtLanes(root);
      VecAt(w + k) = VecAt(w + k) - rule.lr * gk / root;
      VecAt(a + k) = acc;
    }
  }
  return true;
}

JAXEMBED_INLINE void UpdateRow(const Rule& rule, const Params& t, int64_t r, const float* g) {
  const int64_t d = t.d;
  float* w = t.table + r * d;
  float* a = t.slot[0] ? t.slot[0] + r * t.width[0] : nullptr;
  float* b = t.slot[1] ? t.slot[1] + r * t.width[1] : nullptr;
  if (RowWise(rule.kind)) {
    RowWiseRule(rule, w, a, b, g, d);
  } else if (!VectorRule(rule, w, a, g, d)) {
    ElementRule(rule, w, a, b, g, d);
  }
}

// Rows to update are prefetched this many positions ahead: each update waits on the table row
// and its slot rows, most of them cold.
constexpr int64_t kAheadUpdates = 16;

inline void PrefetchRow(const Params& t, int64_t r) {
  if (r < 0 || r >= t.num_rows) return;
  Prefetch(reinterpret_cast<const char*>(t.table), r, t.num_rows, t.d * 4, true);
  for (int i = 0; i < 2; ++i) {
    if (t.slot[i]) {
      Prefetch(reinterpret_cast<const char*>(t.slot[i]), r, t.num_rows, t.width[i] * 4, true);
    }
  }
}

// One optimizer update: the arrays, the rows to update and the rule.
struct Update {
  Params t;
  Indices index;  // ids[i]: distinct rows; ids outside the table are skipped
  int64_t n;
  Rule rule;
};

ffi::Error PrepareUpdate(ffi::Buffer<ffi::F32> lr, ffi::AnyBuffer ids, ffi::RemainingArgs arrays,
                         ffi::RemainingRets results, int32_t kind, int32_t flags,
                         ffi::Span<const float> hyper, int64_t d, Update* u) {
  if (ffi::Error e = AsParams(arrays, results, kind, d, &u->t); e.failure()) return e;
  if (ffi::Error e = AsIndices(ids, &u->index); e.failure()) return e;
  u->n = static_cast<int64_t>(ids.element_count());
  u->rule = Rule{kind, flags, hyper.begin(), *lr.typed_data()};
  if (kind == kPartialRowWiseAdam) {
    if (lr.element_count() != 3) {
      return ffi::Error::InvalidArgument("apply: partial row-wise Adam needs [lr, bias1, bias2]");
    }
    u->rule.bias1 = lr.typed_data()[1];
    u->rule.bias2 = lr.typed_data()[2];
  }
  return ffi::Error::Success();
}

// Rows lo..hi of an update: row ids[i] gets gradient grads[i] or, with `sums`, the sum of
// index i's uses, computed right before its update.
struct UpdateChunkBody {
  const Update& u;
  const float* grads;   // [n, D], or null
  const UseSums* sums;  // or null
  int64_t lo, hi;

  template <int kV>
  JAXEMBED_INLINE void Run() const {
    const Params& t = u.t;
    std::vector<float> scratch(sums != nullptr ? t.d : 0);
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kAheadUpdates < hi) PrefetchRow(t, u.index[i + kAheadUpdates]);
      const int64_t r = u.index[i];
      if (r < 0 || r >= t.num_rows) continue;
      if (sums != nullptr) {
        sums->Sum<kV>(i, i + 1, scratch.data());
        UpdateRow(u.rule, t, r, scratch.data());
      } else {
        UpdateRow(u.rule, t, r, grads + i * t.d);
      }
    }
  }
};

JAXEMBED_SIMD void UpdateChunk(const Update& u, const float* grads, const UseSums* sums,
                               int64_t lo, int64_t hi) {
  UpdateChunkBody body{u, grads, sums, lo, hi};
  WithRowWidth(u.t.d, body);
}

void UpdateRows(ffi::ThreadPool& pool, const Update& u, const float* grads, const UseSums* sums) {
  ParallelFor(pool, u.n, RowGrain(u.t.d * 4 * 3), [&](int64_t lo, int64_t hi) {
    UpdateChunk(u, grads, sums, lo, hi);
  });
}

// Row ids[i] gets gradient grads[i].
ffi::Error ApplyRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lr, ffi::AnyBuffer ids,
                     ffi::Buffer<ffi::F32> grads, ffi::RemainingArgs arrays,
                     ffi::RemainingRets results, int32_t kind, int32_t flags,
                     ffi::Span<const float> hyper) {
  Update u;
  auto gd = grads.dimensions();
  const int64_t d = gd.size() == 2 ? gd[1] : 0;
  if (ffi::Error e = PrepareUpdate(lr, ids, arrays, results, kind, flags, hyper, d, &u);
      e.failure()) {
    return e;
  }
  if (grads.element_count() != static_cast<size_t>(u.n * u.t.d)) {
    return ffi::Error::InvalidArgument("apply_rows: grads must be [len(ids), D]");
  }
  UpdateRows(pool, u, grads.typed_data(), nullptr);
  return ffi::Error::Success();
}

// Row ids[i] gets the transposed slot sum of cot: summed right before its update, with no
// [len(ids), D] gradient array.
ffi::Error ApplySlots(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lr, ffi::AnyBuffer ids,
                      ffi::Buffer<ffi::F32> cot, ffi::Buffer<ffi::S32> head,
                      ffi::Buffer<ffi::F32> head_w, ffi::Buffer<ffi::S32> blocks,
                      ffi::Buffer<ffi::F32> block_w, ffi::RemainingArgs arrays,
                      ffi::RemainingRets results, int32_t kind, int32_t flags,
                      ffi::Span<const float> hyper) {
  Update u;
  auto cd = cot.dimensions();
  const int64_t d = cd.size() == 2 ? cd[1] : 0;
  if (ffi::Error e = PrepareUpdate(lr, ids, arrays, results, kind, flags, hyper, d, &u);
      e.failure()) {
    return e;
  }
  Slots s;
  if (ffi::Error e = AsSlots(head, head_w, blocks, block_w, &s); e.failure()) return e;
  if (cd.size() != 2 || cd[0] != s.num_out || cd[1] != u.t.d) {
    return ffi::Error::InvalidArgument("apply_slots: cot must be [R, D]");
  }
  const Uses uses = BucketSlots(s, u.n);
  const UseSums sums{uses, cot.typed_data(), u.t.d};
  UpdateRows(pool, u, nullptr, &sums);
  return ffi::Error::Success();
}

}  // namespace

// The handlers are the library's only exported symbols (it is built with -fvisibility=hidden).
#define JAXEMBED_EXPORT(name) \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* name(XLA_FFI_CallFrame*)
JAXEMBED_EXPORT(jaxembed_gather_rows);
JAXEMBED_EXPORT(jaxembed_scatter_rows);
JAXEMBED_EXPORT(jaxembed_combine);
JAXEMBED_EXPORT(jaxembed_combine_grad);
JAXEMBED_EXPORT(jaxembed_apply_rows);
JAXEMBED_EXPORT(jaxembed_apply_slots);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_gather_rows, GatherRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_scatter_rows, ScatterRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// The slot operands shared by the slot-sum handlers: head [R, H] int32, its weights (float32,
// empty when unweighted), blocks [R, T, 8] int32, their weights.
template <typename Binding>
auto WithSlots(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::F32>>();
}

// The in-place optimizer handlers end with the table and its slots (in and out, aliased) and
// the rule: its kind, flags and float32 constants.
template <typename Binding>
auto WithRule(Binding binding) {
  return std::move(binding)
      .RemainingArgs()
      .RemainingRets()
      .template Attr<int32_t>("optimizer")
      .template Attr<int32_t>("flags")
      .template Attr<ffi::Span<const float>>("hyper");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_combine, Combine,
                              WithSlots(ffi::Ffi::Bind()
                                            .Ctx<ffi::ThreadPool>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::AnyBuffer>())
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_combine_grad, CombineGrad,
                              WithSlots(ffi::Ffi::Bind()
                                            .Ctx<ffi::ThreadPool>()
                                            .Arg<ffi::Buffer<ffi::F32>>())
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_apply_rows, ApplyRows,
                              WithRule(ffi::Ffi::Bind()
                                           .Ctx<ffi::ThreadPool>()
                                           .Arg<ffi::Buffer<ffi::F32>>()
                                           .Arg<ffi::AnyBuffer>()
                                           .Arg<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_apply_slots, ApplySlots,
                              WithRule(WithSlots(ffi::Ffi::Bind()
                                                     .Ctx<ffi::ThreadPool>()
                                                     .Arg<ffi::Buffer<ffi::F32>>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Arg<ffi::Buffer<ffi::F32>>())));
