// jaxembed's CPU kernels: row gathers, row writes and TF-ordered slot sums, as XLA FFI handlers.
//
// XLA:CPU's gather and scatter run well below memory speed on the row-shaped access of an
// embedding lookup (one 64-float row per index). These handlers move whole rows with memcpy and
// sum slots with vectorised loops over the row, in exactly the order the pure-JAX path (and TF's
// CPU kernels) use, so results are bit-identical to it. Work is split over XLA's intra-op thread
// pool. Built with -ffp-contract=off: a product w * e is rounded before it is added, as in TF.
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

inline void AddRow(float* __restrict acc, const float* __restrict e, int64_t d) {
  for (int64_t k = 0; k < d; ++k) acc[k] += e[k];
}

inline void AddScaledRow(float* __restrict acc, const float* __restrict e, float w, int64_t d) {
  for (int64_t k = 0; k < d; ++k) acc[k] += w * e[k];
}

// acc (zeroed by the caller) += slots [k0, k1) of output row r, in order.
inline void SumSlots(float* __restrict acc, const Slots& s, int64_t r, int64_t k0, int64_t k1,
                     const RowSource& src) {
  for (int64_t k = k0; k < k1; ++k) {
    if (k + kAhead < k1) {
      const float* next = src.row(s.slot(r, k + kAhead));
      if (next != nullptr) {
        for (int64_t off = 0; off < src.d; off += 16) __builtin_prefetch(next + off);
      }
    }
    const float* e = src.row(s.slot(r, k));
    if (e == nullptr) continue;
    if (s.head_w != nullptr) {
      AddScaledRow(acc, e, s.weight(r, k), src.d);
    } else {
      AddRow(acc, e, src.d);
    }
  }
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
    std::vector<float> block(s.t > 0 ? d : 0);
    for (int64_t r = lo; r < hi; ++r) {
      float* acc = dst + r * d;
      std::fill(acc, acc + d, 0.0f);
      SumSlots(acc, s, r, 0, s.h, src);
      for (int64_t b = 0; b < s.t; ++b) {
        std::fill(block.begin(), block.end(), 0.0f);
        SumSlots(block.data(), s, r, s.h + b * kBlock, s.h + (b + 1) * kBlock, src);
        AddRow(acc, block.data(), d);
      }
    }
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

// g (D floats) = the sum of row p's uses.
inline void RowGrad(float* __restrict g, const Uses& u, int64_t p, const float* cot, int64_t d) {
  std::fill(g, g + d, 0.0f);
  const bool weighted = !u.weight.empty();
  for (int64_t e = u.start[p]; e < u.start[p + 1]; ++e) {
    const float* c = cot + static_cast<int64_t>(u.out_row[e]) * d;
    if (weighted) {
      AddScaledRow(g, c, u.weight[e], d);
    } else {
      AddRow(g, c, d);
    }
  }
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
  ParallelFor(pool, num_rows, RowGrain(d * 4 * 4), [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) RowGrad(dst + p * d, uses, p, c, d);
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
        const float new_pow = std::pow(new_acc, p[0]);
        const float delta = new_pow - std::pow(acc, p[0]);
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
inline void RowWiseRule(const Rule& rule, float* w, float* a, float* b, const float* g,
                        int64_t d) {
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

ffi::Error AsParams(ffi::RemainingArgs args, ffi::RemainingRets rets, int32_t kind, Params* out) {
  const size_t want = 1 + SlotCount(kind);
  if (args.size() != want || rets.size() != want) {
    return ffi::Error::InvalidArgument("apply: expected the table and its slots, in and out");
  }
  *out = Params{nullptr, {nullptr, nullptr}, {0, 0}, 0, 0};
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
      out->num_rows = dims[0];
      out->d = dims[1];
    } else if (dims[0] != out->num_rows || dims[1] != out->d) {
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

inline void UpdateRow(const Rule& rule, const Params& t, int64_t r, const float* g) {
  const int64_t d = t.d;
  float* w = t.table + r * d;
  float* a = t.slot[0] ? t.slot[0] + r * t.width[0] : nullptr;
  float* b = t.slot[1] ? t.slot[1] + r * t.width[1] : nullptr;
  if (RowWise(rule.kind)) {
    RowWiseRule(rule, w, a, b, g, d);
    return;
  }
  float unused = 0.0f;
  for (int64_t k = 0; k < d; ++k) {
    rule(w[k], a ? a + k : &unused, b ? b + k : &unused, g[k]);
  }
}

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
                         ffi::Span<const float> hyper, Update* u) {
  if (ffi::Error e = AsParams(arrays, results, kind, &u->t); e.failure()) return e;
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

// Runs the rule on rows ids[i], with row i's gradient grad_of(i, scratch): D floats, which it
// may compute into `scratch` (D floats of its own per thread).
template <typename GradOf>
void UpdateRows(ffi::ThreadPool& pool, const Update& u, GradOf grad_of) {
  const Params& t = u.t;
  ParallelFor(pool, u.n, RowGrain(t.d * 4 * 3), [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(t.d);
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kAhead < hi) PrefetchRow(t, u.index[i + kAhead]);
      const int64_t r = u.index[i];
      if (r >= 0 && r < t.num_rows) UpdateRow(u.rule, t, r, grad_of(i, scratch.data()));
    }
  });
}

// Row ids[i] gets gradient grads[i].
ffi::Error ApplyRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lr, ffi::AnyBuffer ids,
                     ffi::Buffer<ffi::F32> grads, ffi::RemainingArgs arrays,
                     ffi::RemainingRets results, int32_t kind, int32_t flags,
                     ffi::Span<const float> hyper) {
  Update u;
  if (ffi::Error e = PrepareUpdate(lr, ids, arrays, results, kind, flags, hyper, &u);
      e.failure()) {
    return e;
  }
  if (grads.element_count() != static_cast<size_t>(u.n * u.t.d)) {
    return ffi::Error::InvalidArgument("apply_rows: grads must be [len(ids), D]");
  }
  const float* g = grads.typed_data();
  const int64_t d = u.t.d;
  UpdateRows(pool, u, [=](int64_t i, float*) { return g + i * d; });
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
  if (ffi::Error e = PrepareUpdate(lr, ids, arrays, results, kind, flags, hyper, &u);
      e.failure()) {
    return e;
  }
  Slots s;
  if (ffi::Error e = AsSlots(head, head_w, blocks, block_w, &s); e.failure()) return e;
  auto cd = cot.dimensions();
  if (cd.size() != 2 || cd[0] != s.num_out || cd[1] != u.t.d) {
    return ffi::Error::InvalidArgument("apply_slots: cot must be [R, D]");
  }
  const Uses uses = BucketSlots(s, u.n);
  const float* c = cot.typed_data();
  const int64_t d = u.t.d;
  UpdateRows(pool, u, [&](int64_t i, float* scratch) {
    RowGrad(scratch, uses, i, c, d);
    return static_cast<const float*>(scratch);
  });
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
