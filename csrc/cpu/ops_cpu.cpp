// CPU kernels of the peft-sparse ops. Parallelism goes through at::parallel_for (torch's OpenMP pool, so
// torch.set_num_threads applies and no second OpenMP runtime is linked in); inner loops are written for the
// compiler's vectoriser (`#pragma omp simd`, enabled by -fopenmp-simd without any OpenMP runtime).
//
// sddmm_gather: walk the tokens in tiles; per tile, transpose the tile of `input` and `grad_output` to feature-major
//   fp32 buffers ((in + out) * tile floats, sized to stay in L2 and bounded whatever N is), then every entry is a
//   contiguous dot product of length tile. Entries are processed in chunks of consecutive (sorted) indices,
//   so a chunk's entries share grad_output rows, which stay in cache; chunks end only at boundaries of one
//   grouping fixed from the first entry, so the result is the same bits for any number of threads.
//   Floors: bytes = N * (in + out) * sizeof(T) + k * (sizeof(index) + 4); FLOPs = 2 * k * N.
// dequant_scatter: parallel over 4096-element tiles; a tile is decoded into an fp32 buffer, the tile's delta
//   entries (binary search: indices sorted) are added, and the buffer is rounded once into the output.
//   Floors: bytes = numel / 2 + numel / blocksize * sizeof(absmax) + numel * sizeof(out) + k * 8; FLOPs = numel.
// scatter_add: a sequential loop over the k entries. It is O(k) against the O(out * in) copy that always
//   precedes it in the forward, and sequential order makes duplicate indices accumulate without atomics.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../op_checks.h"

namespace {

// Token tiles are sized so that both feature-major tiles, (in + out) * tile floats, stay within this many bytes
// (between kMinTokenTile and kMaxTokenTile tokens). Longer dots amortise each entry's fixed cost; 1 MiB measured
// best on a 2-core EPYC with 512 KiB of L2 per core (256 KiB tiles were 1.1-2.5x slower there).
constexpr int64_t kTileBytes = 1024 * 1024;
constexpr int64_t kMinTokenTile = 16, kMaxTokenTile = 256;
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
// and are folded as a tree, not a serial chain. The whole entry loop (not one dot) is the cloned function, so the
// dot is inlined and the AVX2 clone, resolved once at load time, pays no call per entry.
constexpr int64_t kLanes = 16;

template <typename acc_t>
inline acc_t dot_tile(const acc_t* a, const acc_t* b, int64_t n) {
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
inline void dot_tile4(const acc_t* a, const acc_t* const* b, int64_t n, acc_t* out) {
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

// An AVX2 clone next to the baseline one, chosen by the loader from the CPU it runs on (GCC/Clang function
// multi-versioning). It exists for x86-64 only; other architectures (aarch64) build the baseline function alone.
// MSVC's x86-64 (_M_X64) is left out on purpose: it has no target_clones.
#if defined(__x86_64__)
#define PS_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PS_TARGET_CLONES
#endif

// Entries are taken four at a time where four consecutive entries share a row (dot_tile4), else one at a time
// (dot_tile), greedily from `begin`. The two sum in different orders, so an entry's bits depend on which one it
// went through: `begin` and `end` must be boundaries of the greedy grouping from entry 0 (group_boundaries), which
// makes the grouping, and so the result, independent of how the entries are split between threads.
inline bool starts_group_of_four(const int64_t* rows, int64_t i, int64_t end) {
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
inline void accumulate_entries_impl(const acc_t* grad_tile, const acc_t* input_tile, const int64_t* rows,
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

// Both tiles of a token tile (input and grad_output) transposed in one parallel region.
template <typename scalar_t, typename acc_t>
void transpose_tiles(const scalar_t* input, int64_t input_stride_token, int64_t input_stride_feature,
                     int64_t in_features, const scalar_t* grad, int64_t grad_stride_token,
                     int64_t grad_stride_feature, int64_t out_features, int64_t count, acc_t* input_tile,
                     acc_t* grad_tile) {
  constexpr int64_t kBlock = 16;
  const int64_t input_blocks = (in_features + kBlock - 1) / kBlock;
  const int64_t grad_blocks = (out_features + kBlock - 1) / kBlock;
  at::parallel_for(0, input_blocks + grad_blocks, 4, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      if (block < input_blocks) {
        const int64_t f0 = block * kBlock;
        transpose_block(input, input_stride_token, input_stride_feature, f0, std::min(in_features, f0 + kBlock),
                        count, input_tile);
      } else {
        const int64_t f0 = (block - input_blocks) * kBlock;
        transpose_block(grad, grad_stride_token, grad_stride_feature, f0, std::min(out_features, f0 + kBlock),
                        count, grad_tile);
      }
    }
  });
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
    const int64_t token_tile = std::max(kMinTokenTile, std::min(kMaxTokenTile, by_cache / 16 * 16));
    std::vector<acc_t> input_tile(in_features * token_tile), grad_tile(out_features * token_tile);
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
      for (int64_t n0 = 0; n0 < num_tokens; n0 += token_tile) {
        const int64_t count = std::min(token_tile, num_tokens - n0);
        transpose_tiles(input_data + n0 * input.stride(0), input.stride(0), input.stride(1), in_features,
                        grad_data + n0 * grad_output.stride(0), grad_output.stride(0), grad_output.stride(1),
                        out_features, count, input_tile.data(), grad_tile.data());
        at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
          accumulate_entries(grad_tile.data(), input_tile.data(), rows.data(), cols.data(), result,
                             boundaries[chunk_begin], boundaries[chunk_end], count);
        });
      }
    });
  });
  return out;
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
          for (int64_t e = t0; e < t1; ++e) result[e] = static_cast<scalar_t>(buffer[e - t0]);
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
