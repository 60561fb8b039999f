// CPU kernels of the peft-sparse ops. Parallelism goes through at::parallel_for (torch's OpenMP pool, so
// torch.set_num_threads applies and no second OpenMP runtime is linked in); inner loops are written for the
// compiler's vectoriser (`#pragma omp simd`, enabled by -fopenmp-simd without any OpenMP runtime).
//
// sddmm_gather: the tokens are cut into tiles of up to 128 tokens, and the work items (a tile, or a share of a
//   tile's entries when there are fewer tiles than threads) are spread over the threads. A thread transposes its
//   tile of `input` and `grad_output` into its own feature-major fp32 buffers ((in + out) * tile floats, sized to
//   stay in its core's L2, written and read by the same core, kept between calls: TileScratch), then every entry
//   is a contiguous dot product of length tile. Each tile's dot products go to a per-tile row of partial sums, and
//   the rows are added to the result in tile order; entries are processed in chunks that end only at boundaries of
//   one grouping fixed from the first entry. Tile boundaries depend on the shapes alone, so the result is the same
//   bits for any number of threads.
//   Floors: bytes = N * (in + out) * sizeof(T) + k * (sizeof(index) + 4); FLOPs = 2 * k * N.
// dequant_scatter: parallel over 4096-element tiles; a tile is decoded into an fp32 buffer (16 elements at a time
//   in AVX2 registers where the CPU has them), the tile's delta entries (binary search: indices sorted) are added,
//   and the buffer is rounded once into the output (bf16: also vectorised, c10's rounding bit for bit).
//   Floors: bytes = numel / 2 + numel / blocksize * sizeof(absmax) + numel * sizeof(out) + k * 8; FLOPs = numel.
// scatter_add: a sequential loop over the k entries. It is O(k) against the O(out * in) copy that always
//   precedes it in the forward, and sequential order makes duplicate indices accumulate without atomics.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(_MSC_VER)
#include <malloc.h>
#endif

#include "../op_checks.h"

namespace {

// Token tiles are sized so that one thread's two feature-major tiles, (in + out) * tile floats, stay within this
// many bytes (between kMinTokenTile and kMaxTokenTile tokens, a multiple of 8): the L2 of the core that writes and
// reads them. Measured on a 2-core EPYC (1 MiB L2 per core), N = 1024, 2.5 % density, tiles on huge pages: 128
// tokens were within the noise of the best tile for 512 x 512, 512 x 1376 and 1376 x 512; 64 tokens were
// 1.05-1.2x slower. On 4 KiB pages 128-token tiles were up to 1.5x slower (TLB misses): see TileScratch.
constexpr int64_t kTileBytes = 1024 * 1024;
constexpr int64_t kMinTokenTile = 16, kMaxTokenTile = 128;
// Bound of the per-tile partial sums of one round of tiles (rounds hold at least one tile): the calling thread
// keeps this much between calls (TileScratch).
constexpr int64_t kPartialBytes = 8 << 20;
constexpr int64_t kDequantTile = 4096;

void scatter_add_cpu(at::Tensor dense, const at::Tensor& indices, const at::Tensor& values) {
  peft_sparse_checks::check_scatter_add(dense, indices, values);
  const int64_t k = indices.size(0);
  if (k == 0) return;
  const int64_t cols = dense.size(1);
  const int64_t stride_row = dense.stride(0), stride_col = dense.stride(1);
  const at::Tensor cast_values = values.to(dense.scalar_type()).contiguous();
  const at::Tensor flat_indices = indices.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "scatter_add_cpu", [&] {
    scalar_t* base = dense.data_ptr<scalar_t>();
    const scalar_t* vals = cast_values.data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(flat_indices.scalar_type(), "scatter_add_cpu_index", [&] {
      const index_t* idx = flat_indices.data_ptr<index_t>();
      if (stride_col == 1 && stride_row == cols) {  // row-major contiguous: the flat index is the offset
        for (int64_t i = 0; i < k; ++i) {
          scalar_t& target = base[static_cast<int64_t>(idx[i])];  // in range: check_scatter_add
          target = target + vals[i];
        }
        return;
      }
      for (int64_t i = 0; i < k; ++i) {
        const int64_t flat = static_cast<int64_t>(idx[i]);  // in range: check_scatter_add
        const int64_t row = flat / cols, col = flat - row * cols;
        scalar_t& target = base[row * stride_row + col * stride_col];
        target = target + vals[i];
      }
    });
  });
}

// The hot loop of sddmm_gather: one dot product of length `count` per entry, between the entry's grad_output row
// and input column, both stored feature-major. kLanes independent partial sums hide the latency of the vector adds
// and are folded as a tree, not a serial chain. The whole entry loop (not one dot) is the cloned function, with the
// dots forced inline (PS_INLINE), so each clone, resolved once at load time, runs its own vector width and pays no
// call per entry.
constexpr int64_t kLanes = 16;

// PS_INLINE: these run inside the CPU-specific clones of accumulate_entries only if inlined there (a call would go
// to the one baseline-ISA body); GCC does not inline a template called from three clones on its own.
#if defined(__GNUC__) || defined(__clang__)
#define PS_INLINE inline __attribute__((always_inline))
#else
#define PS_INLINE inline
#endif

template <typename acc_t>
PS_INLINE acc_t dot_tile(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t partial[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) {
#pragma omp simd
    for (int64_t lane = 0; lane < kLanes; ++lane) partial[lane] += a[t + lane] * b[t + lane];
  }
  for (int64_t lane = 0; t < n; ++t, ++lane) partial[lane] += a[t] * b[t];
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
#pragma omp simd
    for (int64_t lane = 0; lane < width; ++lane) partial[lane] += partial[lane + width];
  }
  return partial[0];
}

// Four entries of the same grad_output row at once: the row is loaded once for four dot products, and the four
// accumulators are independent chains.
template <typename acc_t>
PS_INLINE void dot_tile4(const acc_t* a, const acc_t* const* b, int64_t n, acc_t* out) {
  constexpr int64_t kWidth = kLanes / 2;
  acc_t p0[kWidth] = {}, p1[kWidth] = {}, p2[kWidth] = {}, p3[kWidth] = {};
  const acc_t *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
  int64_t t = 0;
  for (; t + kWidth <= n; t += kWidth) {
#pragma omp simd
    for (int64_t lane = 0; lane < kWidth; ++lane) {
      const acc_t av = a[t + lane];
      p0[lane] += av * b0[t + lane];
      p1[lane] += av * b1[t + lane];
      p2[lane] += av * b2[t + lane];
      p3[lane] += av * b3[t + lane];
    }
  }
  for (int64_t lane = 0; t < n; ++t, ++lane) {
    p0[lane] += a[t] * b0[t];
    p1[lane] += a[t] * b1[t];
    p2[lane] += a[t] * b2[t];
    p3[lane] += a[t] * b3[t];
  }
  for (int64_t width = kWidth / 2; width >= 1; width /= 2) {
#pragma omp simd
    for (int64_t lane = 0; lane < width; ++lane) {
      p0[lane] += p0[lane + width];
      p1[lane] += p1[lane + width];
      p2[lane] += p2[lane + width];
      p3[lane] += p3[lane + width];
    }
  }
  out[0] += p0[0];
  out[1] += p1[0];
  out[2] += p2[0];
  out[3] += p3[0];
}

// AVX-512 and AVX2 clones next to the baseline one, chosen by the loader from the CPU it runs on (GCC/Clang
// function multi-versioning; the AVX-512 clone was 10-25 % faster than the AVX2 one on a Zen 4 EPYC). Without
// floating-point contraction (-ffp-contract=off) every clone computes the same lane-wise sums, so the bits do not
// depend on the CPU. Clones exist for x86-64 only; other architectures (aarch64) build the baseline function
// alone. MSVC's x86-64 (_M_X64) is left out on purpose: it has no target_clones.
#if defined(__x86_64__)
#define PS_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PS_TARGET_CLONES
#endif

// Entries are taken four at a time where four consecutive entries share a row (dot_tile4), else one at a time
// (dot_tile), greedily from `begin`. The two sum in different orders, so an entry's bits depend on which one it
// went through: `begin` and `end` must be boundaries of the greedy grouping from entry 0 (group_boundaries), which
// makes the grouping, and so the result, independent of how the entries are split between threads.
PS_INLINE bool starts_group_of_four(const int64_t* rows, int64_t i, int64_t end) {
  // Indices need not be sorted here, so all four rows are compared.
  return i + 4 <= end && rows[i + 1] == rows[i] && rows[i + 2] == rows[i] && rows[i + 3] == rows[i];
}

// Every 64th group's first entry, from entry 0, and k: the chunk boundaries the threads split the entries at.
std::vector<int64_t> group_boundaries(const int64_t* rows, int64_t k) {
  constexpr int64_t kGroupsPerChunk = 64;
  std::vector<int64_t> boundaries{0};
  int64_t groups = 0;
  for (int64_t i = 0; i < k;) {
    i += starts_group_of_four(rows, i, k) ? 4 : 1;
    if (++groups % kGroupsPerChunk == 0 && i < k) boundaries.push_back(i);
  }
  boundaries.push_back(k);
  return boundaries;
}

template <typename acc_t>
PS_INLINE void accumulate_entries_impl(const acc_t* grad_tile, const acc_t* input_tile, const int64_t* rows,
                                    const int64_t* cols, acc_t* result, int64_t begin, int64_t end, int64_t count) {
  int64_t i = begin;
  while (i < end) {
    if (starts_group_of_four(rows, i, end)) {
      const acc_t* columns[4] = {input_tile + cols[i] * count, input_tile + cols[i + 1] * count,
                                 input_tile + cols[i + 2] * count, input_tile + cols[i + 3] * count};
      dot_tile4(grad_tile + rows[i] * count, columns, count, result + i);
      i += 4;
    } else {
      result[i] += dot_tile(grad_tile + rows[i] * count, input_tile + cols[i] * count, count);
      ++i;
    }
  }
}

PS_TARGET_CLONES void accumulate_entries(
    const float* grad_tile, const float* input_tile, const int64_t* rows, const int64_t* cols, float* result,
    int64_t begin, int64_t end, int64_t count) {
  accumulate_entries_impl(grad_tile, input_tile, rows, cols, result, begin, end, count);
}

PS_TARGET_CLONES void accumulate_entries(
    const double* grad_tile, const double* input_tile, const int64_t* rows, const int64_t* cols, double* result,
    int64_t begin, int64_t end, int64_t count) {
  accumulate_entries_impl(grad_tile, input_tile, rows, cols, result, begin, end, count);
}

// Features [f0, f1) of rows [0, count) of a (tokens, features) strided matrix, converted to acc_t, into a
// feature-major (features, count) buffer, in 16 x 16 blocks that keep both the reads and the writes within a few
// cache lines at a time. Rows of unit feature stride (the usual case) get a loop the compiler can vectorise.
template <typename scalar_t, typename acc_t>
void transpose_block(const scalar_t* source, int64_t stride_token, int64_t stride_feature, int64_t f0, int64_t f1,
                     int64_t count, acc_t* buffer) {
  constexpr int64_t kBlock = 16;
  for (int64_t t0 = 0; t0 < count; t0 += kBlock) {
    const int64_t t1 = std::min(count, t0 + kBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const scalar_t* row = source + t * stride_token;
      if (stride_feature == 1) {
        for (int64_t f = f0; f < f1; ++f) buffer[f * count + t] = static_cast<acc_t>(row[f]);
      } else {
        for (int64_t f = f0; f < f1; ++f) buffer[f * count + t] = static_cast<acc_t>(row[f * stride_feature]);
      }
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PS_HAVE_AVX2 1  // the AVX2/F16C transposes, 4-bit decode and bf16 rounding below (chosen at run time)
#define PS_AVX2_F16C __attribute__((target("avx2,f16c")))
// Eight consecutive elements widened to fp32 (exactly: every bf16 and fp16 value is an fp32 value).
PS_AVX2_F16C inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PS_AVX2_F16C inline __m256 load8(const c10::BFloat16* p) {
  const __m256i widened = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(widened, 16));  // bf16 is the high half of an fp32
}
PS_AVX2_F16C inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Rows of unit feature stride (fp32, bf16 or fp16) into an fp32 feature-major buffer, 8 x 8 at a time in AVX
// registers (the compiler does not vectorise the strided stores of transpose_block; this was 1.5-3x faster on the
// tiles of sddmm_gather). Pure data movement and exact widening: the same bits as transpose_block. Called only where
// the CPU has AVX2 and F16C (has_avx2_f16c).
template <typename scalar_t>
PS_AVX2_F16C void transpose_to_fp32_avx2(const scalar_t* source, int64_t stride_token, int64_t features,
                                         int64_t count, float* buffer) {
  const int64_t features8 = features / 8 * 8, count8 = count / 8 * 8;
  // Eight source rows at a time, each read front to back (eight sequential streams for the prefetcher; walking the
  // features in the outer loop instead was 1.2-1.8x slower).
  for (int64_t t = 0; t < count8; t += 8) {
    for (int64_t f = 0; f < features8; f += 8) {
      const scalar_t* s = source + t * stride_token + f;
      __m256 r[8], u[8], v[8];
      for (int j = 0; j < 8; ++j) r[j] = load8(s + j * stride_token);
      for (int j = 0; j < 8; j += 2) {
        u[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
        u[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
      }
      for (int j = 0; j < 8; j += 4) {
        v[j] = _mm256_shuffle_ps(u[j], u[j + 2], 0x44);
        v[j + 1] = _mm256_shuffle_ps(u[j], u[j + 2], 0xEE);
        v[j + 2] = _mm256_shuffle_ps(u[j + 1], u[j + 3], 0x44);
        v[j + 3] = _mm256_shuffle_ps(u[j + 1], u[j + 3], 0xEE);
      }
      float* d = buffer + f * count + t;
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_ps(d + j * count, _mm256_permute2f128_ps(v[j], v[j + 4], 0x20));
        _mm256_storeu_ps(d + (j + 4) * count, _mm256_permute2f128_ps(v[j], v[j + 4], 0x31));
      }
    }
  }
  for (int64_t t = count8; t < count; ++t) {
    for (int64_t f = 0; f < features8; ++f) buffer[f * count + t] = static_cast<float>(source[t * stride_token + f]);
  }
  for (int64_t f = features8; f < features; ++f) {
    for (int64_t t = 0; t < count; ++t) buffer[f * count + t] = static_cast<float>(source[t * stride_token + f]);
  }
}

bool has_avx2_f16c() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return supported;
}

// table[index] for eight 4-bit indices (0-15) in 32-bit lanes: two 8-entry permutes, bit 3 picks which.
PS_AVX2_F16C inline __m256 lookup16(__m256 low, __m256 high, __m256i index) {
  const __m256 from_high = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));  // bit 3 -> sign bit
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, index), _mm256_permutevar8x32_ps(high, index), from_high);
}

// Packed bytes decoded to floats, table[nibble] * scale, high nibble first, 16 at a time: the same products (one
// fp32 rounding each) as dequant_scatter's scalar loop. Decodes the whole groups of 8 of the `pairs` bytes and
// returns how many bytes that was; the caller's scalar loop decodes the rest.
PS_AVX2_F16C int64_t decode_4bit_avx2(const uint8_t* bytes, int64_t pairs, const float* table, float scale,
                                      float* out) {
  const __m256 low = _mm256_loadu_ps(table), high = _mm256_loadu_ps(table + 8), factor = _mm256_set1_ps(scale);
  const __m256i nibble = _mm256_set1_epi32(15);
  int64_t p = 0;
  for (; p + 8 <= pairs; p += 8) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + p)));
    const __m256i h = _mm256_srli_epi32(b, 4), l = _mm256_and_si256(b, nibble);
    const __m256i a = _mm256_unpacklo_epi32(h, l), c = _mm256_unpackhi_epi32(h, l);  // h0 l0 h1 l1 | h4 l4 h5 l5
    const __m256i first = _mm256_permute2x128_si256(a, c, 0x20), second = _mm256_permute2x128_si256(a, c, 0x31);
    _mm256_storeu_ps(out + 2 * p, _mm256_mul_ps(lookup16(low, high, first), factor));
    _mm256_storeu_ps(out + 2 * p + 8, _mm256_mul_ps(lookup16(low, high, second), factor));
  }
  return p;
}

// Round to nearest even, eight fp32 lanes to bf16 bits in 32-bit lanes, NaN to 0x7FC0: c10::BFloat16's conversion.
PS_AVX2_F16C inline __m256i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

// The whole groups of 16 of `n` floats rounded to bf16 (bf16_bits); returns how many that was.
PS_AVX2_F16C int64_t round_to_bf16_avx2(const float* in, int64_t n, c10::BFloat16* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i first = bf16_bits(_mm256_loadu_ps(in + i)), second = bf16_bits(_mm256_loadu_ps(in + i + 8));
    // packus interleaves the two by 128-bit lane: 0xD8 puts the four 64-bit quarters back in order
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm256_permute4x64_epi64(_mm256_packus_epi32(first, second), 0xD8));
  }
  return i;
}
#endif

// All features of rows [0, count) into a feature-major (features, count) buffer of acc_t.
template <typename scalar_t, typename acc_t>
void transpose_tile(const scalar_t* source, int64_t stride_token, int64_t stride_feature, int64_t features,
                    int64_t count, acc_t* buffer) {
#ifdef PS_HAVE_AVX2
  if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<scalar_t, double>) {
    if (stride_feature == 1 && has_avx2_f16c()) {
      transpose_to_fp32_avx2(source, stride_token, features, count, buffer);
      return;
    }
  }
#endif
  constexpr int64_t kBlock = 16;
  for (int64_t f0 = 0; f0 < features; f0 += kBlock) {
    transpose_block(source, stride_token, stride_feature, f0, std::min(features, f0 + kBlock), count, buffer);
  }
}

// Scratch memory of sddmm_gather, kept between calls (grow-only; freed when the thread ends): each thread's tile
// buffers (at most about kTileBytes) and the calling thread's per-tile partial sums (at most about kPartialBytes).
// Allocating them per call cost 20-25 % of the op (page faults on fresh memory). Aligned to 2 MiB and marked for
// transparent huge pages where Linux offers them (madvise mode): the entries read columns all over a tile, and on
// 4 KiB pages those reads missed the TLB (1.3x slower on the tiles here). thread_local, so concurrent calls from
// several threads never share one.
void* aligned_allocate(size_t alignment, size_t bytes) {  // bytes: a multiple of alignment
#if defined(_MSC_VER)
  return _aligned_malloc(bytes, alignment);
#else
  return std::aligned_alloc(alignment, bytes);
#endif
}

void aligned_free(void* data) {
#if defined(_MSC_VER)
  _aligned_free(data);
#else
  std::free(data);
#endif
}

class TileScratch {
 public:
  TileScratch() = default;
  TileScratch(const TileScratch&) = delete;
  TileScratch& operator=(const TileScratch&) = delete;
  ~TileScratch() { aligned_free(data_); }

  void* get(size_t bytes) {
    if (bytes <= capacity_) return data_;
    constexpr size_t kHugePage = size_t{2} << 20;
    const size_t capacity = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = aligned_allocate(kHugePage, capacity);
    TORCH_CHECK(data != nullptr, "sddmm_gather: could not allocate ", capacity, " bytes of tile buffers");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data, capacity, MADV_HUGEPAGE);  // advice only: without huge pages the buffer works the same
#endif
    aligned_free(data_);
    data_ = data;
    capacity_ = capacity;
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

TileScratch& tile_scratch() {
  thread_local TileScratch scratch;
  return scratch;
}

TileScratch& partial_scratch() {
  thread_local TileScratch scratch;
  return scratch;
}

at::Tensor sddmm_gather_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                            int64_t in_features) {
  peft_sparse_checks::check_sddmm_gather(grad_output, input, indices, in_features);
  const bool fp64 = input.scalar_type() == at::kDouble;
  const int64_t k = indices.size(0);
  at::Tensor out = at::zeros({k}, input.options().dtype(fp64 ? at::kDouble : at::kFloat));
  const int64_t num_tokens = input.size(0), out_features = grad_output.size(1);
  if (k == 0 || num_tokens == 0) return out;
  const at::Tensor flat_indices = indices.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sddmm_gather_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int64_t by_cache = kTileBytes / (static_cast<int64_t>(sizeof(acc_t)) * (in_features + out_features));
    const int64_t token_tile = std::max(kMinTokenTile, std::min(kMaxTokenTile, by_cache / 8 * 8));
    acc_t* result = out.data_ptr<acc_t>();
    const scalar_t* input_data = input.data_ptr<scalar_t>();
    const scalar_t* grad_data = grad_output.data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(flat_indices.scalar_type(), "sddmm_gather_cpu_index", [&] {
      const index_t* idx = flat_indices.data_ptr<index_t>();
      // Entries (in range: check_sddmm_gather) are split into (row, col) once; the tile loop below reuses them (a
      // 64-bit division per entry and tile would cost as much as the dot product itself).
      std::vector<int64_t> rows(k), cols(k);
      if (out_features * in_features <= static_cast<int64_t>(UINT32_MAX)) {  // 32-bit division: several times faster
        const uint32_t width = static_cast<uint32_t>(in_features);
        for (int64_t i = 0; i < k; ++i) {
          const uint32_t flat = static_cast<uint32_t>(idx[i]);
          rows[i] = flat / width;
          cols[i] = flat - static_cast<uint32_t>(rows[i]) * width;
        }
      } else {
        for (int64_t i = 0; i < k; ++i) {
          const int64_t flat = static_cast<int64_t>(idx[i]);
          rows[i] = flat / in_features;
          cols[i] = flat - rows[i] * in_features;
        }
      }
      const std::vector<int64_t> boundaries = group_boundaries(rows.data(), k);
      const int64_t num_chunks = static_cast<int64_t>(boundaries.size()) - 1;
      const int64_t num_tiles = (num_tokens + token_tile - 1) / token_tile;
      // The work plan below depends on the thread count; the bits do not (see the comment at the top).
      const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
      const int64_t by_memory = std::max<int64_t>(1, kPartialBytes / (static_cast<int64_t>(sizeof(acc_t)) * k));
      const int64_t round_tiles = std::min({num_tiles, std::max<int64_t>(threads, 8), by_memory});
      const int64_t shares = std::min(num_chunks, (threads + round_tiles - 1) / round_tiles);  // items per tile
      const int64_t tile_floats = (in_features + out_features) * token_tile;
      const size_t partial_bytes = static_cast<size_t>(round_tiles * k) * sizeof(acc_t);
      acc_t* partial = static_cast<acc_t*>(partial_scratch().get(partial_bytes));
      for (int64_t first = 0; first < num_tiles; first += round_tiles) {
        const int64_t tiles = std::min(round_tiles, num_tiles - first);
        at::parallel_for(0, tiles * shares, 1, [&](int64_t item_begin, int64_t item_end) {
          const size_t tile_bytes = static_cast<size_t>(tile_floats) * sizeof(acc_t);
          acc_t* input_tile = static_cast<acc_t*>(tile_scratch().get(tile_bytes));
          acc_t* grad_tile = input_tile + in_features * token_tile;
          int64_t transposed = -1;
          for (int64_t item = item_begin; item < item_end; ++item) {
            const int64_t tile = item / shares, share = item % shares;
            const int64_t n0 = (first + tile) * token_tile, count = std::min(token_tile, num_tokens - n0);
            if (tile != transposed) {
              transpose_tile(input_data + n0 * input.stride(0), input.stride(0), input.stride(1), in_features, count,
                             input_tile);
              transpose_tile(grad_data + n0 * grad_output.stride(0), grad_output.stride(0), grad_output.stride(1),
                             out_features, count, grad_tile);
              transposed = tile;
            }
            const int64_t begin = boundaries[num_chunks * share / shares];
            const int64_t end = boundaries[num_chunks * (share + 1) / shares];
            acc_t* sums = partial + tile * k;
            std::fill(sums + begin, sums + end, acc_t(0));
            accumulate_entries(grad_tile, input_tile, rows.data(), cols.data(), sums, begin, end, count);
          }
        });
        at::parallel_for(0, k, 4096, [&](int64_t begin, int64_t end) {
          for (int64_t tile = 0; tile < tiles; ++tile) {
            const acc_t* sums = partial + tile * k;
            for (int64_t i = begin; i < end; ++i) result[i] += sums[i];
          }
        });
      }
    });
  });
  return out;
}

// A decoded fp32 tile rounded once into the output dtype; bf16 with vector instructions where `vector` (the CPU has
// AVX2), with the same bits.
template <typename scalar_t>
void round_tile(const float* tile, int64_t n, scalar_t* out, [[maybe_unused]] bool vector) {
  int64_t e = 0;
#ifdef PS_HAVE_AVX2
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (vector) e = round_to_bf16_avx2(tile, n, out);
  }
#endif
  for (; e < n; ++e) out[e] = static_cast<scalar_t>(tile[e]);
}

at::Tensor dequant_scatter_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               int64_t blocksize, c10::SymIntArrayRef shape, at::ScalarType out_dtype,
                               const at::Tensor& indices, const at::Tensor& values,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, int64_t nested_blocksize,
                               double offset) {
  const auto layout = peft_sparse_checks::check_dequant_scatter(packed, absmax, code, blocksize, shape, out_dtype,
                                                                indices, values, nested_absmax, nested_code,
                                                                nested_blocksize);
  const int64_t numel = layout.numel;
  const bool nested = layout.nested;
  at::Tensor nested_absmax_c, nested_code_c;
  if (nested) {
    nested_absmax_c = nested_absmax->to(at::kFloat).contiguous();
    nested_code_c = nested_code->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty(layout.sizes, packed.options().dtype(out_dtype));
  if (numel == 0) return out;
  const at::Tensor packed_c = packed.contiguous(), absmax_c = absmax.contiguous(), code_c = code.contiguous();
  const at::Tensor indices_c = indices.contiguous(), values_f = values.to(at::kFloat).contiguous();
  const int64_t k = indices_c.size(0);
  const uint8_t* bytes = packed_c.data_ptr<uint8_t>();
  const float* table = code_c.data_ptr<float>();
  const float* values_ptr = values_f.data_ptr<float>();
  const float offset_f = static_cast<float>(offset);
  const float* absmax_values = nested ? nullptr : absmax_c.data_ptr<float>();
  const uint8_t* absmax_codes = nested ? absmax_c.data_ptr<uint8_t>() : nullptr;
  const float* nested_table = nested ? nested_code_c.data_ptr<float>() : nullptr;
  const float* nested_scales = nested ? nested_absmax_c.data_ptr<float>() : nullptr;
  // Both values of every possible byte (high nibble first): one lookup per byte instead of a shift, a mask and a
  // branch per element.
  float pair_table[512];
  for (int byte = 0; byte < 256; ++byte) {
    pair_table[2 * byte] = table[byte >> 4];
    pair_table[2 * byte + 1] = table[byte & 15];
  }

#ifdef PS_HAVE_AVX2
  const bool vector = has_avx2_f16c();
#else
  const bool vector = false;
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "dequant_scatter_cpu", [&] {
    scalar_t* result = out.data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(indices_c.scalar_type(), "dequant_scatter_cpu_index", [&] {
      const index_t* idx = indices_c.data_ptr<index_t>();  // in range and sorted: check_dequant_scatter
      const int64_t num_tiles = (numel + kDequantTile - 1) / kDequantTile;
      at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
        std::vector<float> buffer(kDequantTile);
        for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
          const int64_t t0 = tile * kDequantTile, t1 = std::min(numel, t0 + kDequantTile);
          // One quantisation block (one scale) at a time.
          for (int64_t e0 = t0; e0 < t1;) {
            const int64_t block = e0 / blocksize;
            const int64_t e1 = std::min(t1, (block + 1) * blocksize);
            // Separate multiply and add, no contraction (-ffp-contract=off): bitsandbytes computes the nested
            // absmax as code * absmax, then + offset, each rounded to fp32.
            const float scale = nested ? nested_table[absmax_codes[block]] * nested_scales[block / nested_blocksize] +
                                             offset_f
                                       : absmax_values[block];
            int64_t e = e0;
            if (e & 1) {  // a block may start on the low nibble of a byte
              buffer[e - t0] = table[bytes[e >> 1] & 15] * scale;
              ++e;
            }
#ifdef PS_HAVE_AVX2
            if (vector) {
              e += 2 * decode_4bit_avx2(bytes + (e >> 1), (e1 - e) / 2, table, scale, buffer.data() + (e - t0));
            }
#endif
            for (; e + 1 < e1; e += 2) {
              const float* pair = pair_table + 2 * bytes[e >> 1];
              buffer[e - t0] = pair[0] * scale;
              buffer[e + 1 - t0] = pair[1] * scale;
            }
            if (e < e1) buffer[e - t0] = table[bytes[e >> 1] >> 4] * scale;
            e0 = e1;
          }
          const index_t* first = std::lower_bound(idx, idx + k, static_cast<index_t>(t0));
          for (const index_t* p = first; p != idx + k && static_cast<int64_t>(*p) < t1; ++p) {
            buffer[static_cast<int64_t>(*p) - t0] += values_ptr[p - idx];
          }
          round_tile(buffer.data(), t1 - t0, result + t0, vector);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_sparse, CPU, m) {
  m.impl("scatter_add_", &scatter_add_cpu);
  m.impl("sddmm_gather", &sddmm_gather_cpu);
  m.impl("dequant_scatter", &dequant_scatter_cpu);
}
