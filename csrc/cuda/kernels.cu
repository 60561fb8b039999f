// peft-sparse CUDA kernels: scatter_add, sddmm_gather (sampled gradient gather) and dequant_scatter.
//
// This file includes no PyTorch header and, in its device part, no header at all, so that it compiles three ways:
// inside the CUDAExtension build (with the host launchers at the bottom), at run time with CuPy/NVRTC (which
// defines __CUDACC_RTC__ and sees only the extern "C" kernels), and with a plain `nvcc -c` on a CPU machine as a
// compile check. Half and bfloat16 values travel as raw 16-bit words and are converted here.
//
// ---------------------------------------------------------------------------------------------------------------
// scatter_add: dense[row, col] += values[i] for (row, col) = divmod(indices[i], cols).
//   Launch: one thread per entry, 256 threads per block. Atomic adds (CAS on the aligned 32-bit word for 16-bit
//   types), so duplicate indices accumulate as in the reference.
//   Floors: bytes = k * (sizeof(index) + 2 * sizeof(T)) (each touched weight read and written once, plus the
//   pair); FLOPs = k.
//
// sddmm_gather: out[i] = sum_n grad_output[n, row_i] * input[n, col_i], with fp32 accumulation (fp64 for fp64).
//   Launch: grid (ceil(k / 8), splits), 256 threads: one warp per entry and token range; the binding passes
//   token-contiguous operands, so each lane reads 16-byte vectors; warp-shuffle sums; per-split partial sums are
//   added by a second kernel in a fixed order (deterministic, no float atomics). Splits are sized so a range of
//   `input` stays in L2 (the launch plan, shared with the CuPy path: csrc/sddmm_plan.h).
//   Floors: bytes = N * (in + out) * sizeof(T) + k * (sizeof(index) + 4); FLOPs = 2 * k * N. The byte floor assumes
//   every operand is read once; an unstructured mask makes each entry read its own two length-N vectors, so the
//   realistic bound is 2 * k * N * sizeof(T) bytes from L2 (plus the transposes), or, from the other side, the
//   dense product grad.T @ input on the tensor cores (2 * N * out * in FLOPs), whichever is smaller.
//
// dequant_scatter: bitsandbytes 4-bit (NF4/FP4 through a 16-entry code table, optional double quantisation)
//   dequantised in fp32, a sparse fp32 delta added, rounded once to the output dtype.
//   Launch: two kernels on one stream. ps_dequant_scatter_*: one block of 256 threads per 4096-element tile, 16
//   elements per thread (one 8-byte load of codes, one absmax: every bitsandbytes block size is a multiple of 16,
//   16-byte stores), a pure stream that ignores the delta. ps_dequant_fixup_*: one thread per delta entry; the head
//   of each run of equal (sorted) indices recomputes its fp32 value, adds the run's deltas in index order and
//   overwrites the output, so every output is still rounded once. (A first version searched each tile's delta
//   range at block start; the dependent loads of that binary search capped it at ~0.7 TB/s on an H200.) Products
//   use __fmul_rn/__fadd_rn so the compiler cannot contract them into FMAs: the fp32 values equal bitsandbytes'
//   bit for bit.
//   Floors: bytes = numel / 2 + numel / blocksize * sizeof(absmax) + numel * sizeof(out) + k * 8; FLOPs = numel.
// ---------------------------------------------------------------------------------------------------------------

#ifndef __CUDACC_RTC__
#include "kernels.h"
#endif

typedef unsigned char ps_u8;
typedef unsigned short ps_u16;
typedef unsigned int ps_u32;
typedef long long ps_i64;
typedef unsigned long long ps_u64;

#define PS_THREADS 256
#define PS_DQ_TILE 4096

// ---- storage types --------------------------------------------------------------------------------------------

struct PsF32 {
  typedef float T;
  typedef float Acc;
  __device__ static __forceinline__ float to_acc(float v) { return v; }
  __device__ static __forceinline__ float from_float(float v) { return v; }
  __device__ static __forceinline__ void atomic_add(float* address, float v) { atomicAdd(address, v); }
};

struct PsF64 {
  typedef double T;
  typedef double Acc;
  __device__ static __forceinline__ double to_acc(double v) { return v; }
  __device__ static __forceinline__ double from_float(float v) { return v; }
  __device__ static __forceinline__ void atomic_add(double* address, double v) { atomicAdd(address, v); }
};

template <class Derived>
struct Ps16BitOps {
  // Add in fp32 and round once, as torch does for half/bfloat16 tensors; CAS on the containing aligned word.
  __device__ static void atomic_add(ps_u16* address, ps_u16 v) {
    ps_u32* word = (ps_u32*)((ps_u64)address & ~(ps_u64)3);
    const bool high = ((ps_u64)address & 2) != 0;
    ps_u32 old = *word, assumed;
    do {
      assumed = old;
      const ps_u16 current = high ? (ps_u16)(assumed >> 16) : (ps_u16)(assumed & 0xffffu);
      const ps_u16 updated = Derived::from_float(Derived::to_acc(current) + Derived::to_acc(v));
      const ps_u32 replacement =
          high ? ((assumed & 0x0000ffffu) | ((ps_u32)updated << 16)) : ((assumed & 0xffff0000u) | updated);
      old = atomicCAS(word, assumed, replacement);
    } while (assumed != old);
  }
};

struct PsF16 : Ps16BitOps<PsF16> {
  typedef ps_u16 T;
  typedef float Acc;
  __device__ static __forceinline__ float to_acc(ps_u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
  __device__ static __forceinline__ ps_u16 from_float(float f) {
    ps_u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
};

struct PsBF16 : Ps16BitOps<PsBF16> {
  typedef ps_u16 T;
  typedef float Acc;
  __device__ static __forceinline__ float to_acc(ps_u16 b) { return __uint_as_float(((ps_u32)b) << 16); }
  __device__ static __forceinline__ ps_u16 from_float(float f) {
    // Round to nearest even, as torch does; NaN stays a quiet NaN.
    ps_u32 bits = __float_as_uint(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (ps_u16)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (ps_u16)(bits >> 16);
  }
};

// ---- scatter_add -------------------------------------------------------------------------------------------------

template <class Tr, class Idx>
__device__ __forceinline__ void scatter_add_body(typename Tr::T* dense, ps_i64 cols, ps_i64 stride_row,
                                                 ps_i64 stride_col, const Idx* indices,
                                                 const typename Tr::T* values, ps_i64 k) {
  const ps_i64 i = (ps_i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= k) return;
  const ps_i64 flat = (ps_i64)indices[i];
  const ps_i64 row = flat / cols;
  const ps_i64 col = flat - row * cols;
  Tr::atomic_add(dense + row * stride_row + col * stride_col, values[i]);
}

// ---- sddmm_gather ------------------------------------------------------------------------------------------------
//
// One warp per entry: the dot product of grad_output[:, row] and input[:, col] over this split's token range.
// The launcher passes token-contiguous operands (stride_token == 1: the (N, features) tensors transposed once, a
// cheap copy next to this kernel), so each lane reads 16 bytes at a time and the warp streams 512 contiguous
// bytes per operand per step; consecutive entries (sorted indices) share their grad row, which stays in L1, and a
// split's input columns are sized by the launcher to stay in L2. The warp's sum is reduced by shuffles in a fixed
// order, so results are deterministic. Any other strides take the scalar loop (correct, slower).

#define PS_WARPS_PER_BLOCK (PS_THREADS / 32)

template <class Tr>
__device__ __forceinline__ typename Tr::Acc ps_dot_contiguous(const typename Tr::T* a, const typename Tr::T* b,
                                                              ps_i64 count, int lane) {
  typedef typename Tr::T T;
  typedef typename Tr::Acc Acc;
  const int vec = 16 / (int)sizeof(T);
  Acc sum = 0;
  ps_i64 n = 0;
  if ((((ps_u64)a | (ps_u64)b) & 15) == 0) {
    const ps_i64 vector_end = count / vec * vec;
#pragma unroll 4
    for (n = (ps_i64)lane * vec; n < vector_end; n += 32 * vec) {
      const uint4 ua = *(const uint4*)(a + n);
      const uint4 ub = *(const uint4*)(b + n);
      const T* va = (const T*)&ua;
      const T* vb = (const T*)&ub;
#pragma unroll
      for (int q = 0; q < 16 / (int)sizeof(T); ++q) sum += Tr::to_acc(va[q]) * Tr::to_acc(vb[q]);
    }
    n = vector_end;
  }
  for (ps_i64 m = n + lane; m < count; m += 32) sum += Tr::to_acc(a[m]) * Tr::to_acc(b[m]);
  return sum;
}

template <class Acc>
__device__ __forceinline__ Acc ps_warp_sum(Acc value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <class Tr, class Idx>
__device__ __forceinline__ void sddmm_body(const typename Tr::T* grad, ps_i64 grad_stride_token,
                                           ps_i64 grad_stride_feature, const typename Tr::T* input,
                                           ps_i64 input_stride_token, ps_i64 input_stride_feature, ps_i64 num_tokens,
                                           ps_i64 in_features, const Idx* indices, ps_i64 k,
                                           ps_i64 tokens_per_split, typename Tr::Acc* partial) {
  typedef typename Tr::Acc Acc;
  const int lane = threadIdx.x & 31;
  const ps_i64 entry = (ps_i64)blockIdx.x * PS_WARPS_PER_BLOCK + (threadIdx.x >> 5);
  if (entry >= k) return;  // whole warps leave together
  const ps_i64 begin = (ps_i64)blockIdx.y * tokens_per_split;
  const ps_i64 end = begin + tokens_per_split < num_tokens ? begin + tokens_per_split : num_tokens;
  const ps_i64 flat = (ps_i64)indices[entry];
  const ps_i64 row = flat / in_features;
  const ps_i64 col = flat - row * in_features;
  Acc sum = 0;
  if (grad_stride_token == 1 && input_stride_token == 1) {
    sum = ps_dot_contiguous<Tr>(grad + row * grad_stride_feature + begin, input + col * input_stride_feature + begin,
                                end - begin, lane);
  } else {
    for (ps_i64 n = begin + lane; n < end; n += 32) {
      sum += Tr::to_acc(grad[n * grad_stride_token + row * grad_stride_feature]) *
             Tr::to_acc(input[n * input_stride_token + col * input_stride_feature]);
    }
  }
  sum = ps_warp_sum<Acc>(sum);
  if (lane == 0) partial[(ps_i64)blockIdx.y * k + entry] = sum;
}

template <class Acc>
__device__ __forceinline__ void reduce_splits_body(const Acc* partial, ps_i64 splits, ps_i64 k, Acc* out) {
  const ps_i64 i = (ps_i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= k) return;
  Acc sum = 0;
  for (ps_i64 s = 0; s < splits; ++s) sum += partial[s * k + i];  // fixed order: deterministic
  out[i] = sum;
}

// ---- dequant_scatter ---------------------------------------------------------------------------------------------

#define PS_DQ_PER_THREAD 16  // PS_DQ_TILE / PS_THREADS: 8 packed bytes in, 16 outputs out per thread

__device__ __forceinline__ float ps_block_absmax(const float* absmax_f32, const ps_u8* absmax_q,
                                                 const float* nested_absmax, const float* nested_code,
                                                 ps_i64 nested_blocksize, float offset, ps_i64 block) {
  return absmax_q == 0 ? absmax_f32[block]
                       : __fadd_rn(__fmul_rn(nested_code[absmax_q[block]], nested_absmax[block / nested_blocksize]),
                                   offset);
}

// Pass 1: the whole weight, dequantised and rounded to the output dtype, streamed with no look at the delta.
template <class Tr>
__device__ __forceinline__ void dequant_body(const ps_u8* packed, const float* absmax_f32, const ps_u8* absmax_q,
                                             const float* code, ps_i64 blocksize, const float* nested_absmax,
                                             const float* nested_code, ps_i64 nested_blocksize, float offset,
                                             ps_i64 numel, typename Tr::T* out) {
  typedef typename Tr::T T;
  __shared__ float code_shared[16];
  if (threadIdx.x < 16) code_shared[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const ps_i64 e0 = (ps_i64)blockIdx.x * PS_DQ_TILE + (ps_i64)threadIdx.x * PS_DQ_PER_THREAD;
  if (e0 >= numel) return;
  const ps_i64 count = numel - e0 < PS_DQ_PER_THREAD ? numel - e0 : PS_DQ_PER_THREAD;
  float v[PS_DQ_PER_THREAD];
  // 16 consecutive elements starting at a multiple of 16 share one absmax when the block size is a multiple of 16
  // (every bitsandbytes block size is); otherwise each element looks its own up.
  if (count == PS_DQ_PER_THREAD && (((ps_u64)(packed + e0 / 2)) & 7) == 0 && (blocksize & 15) == 0) {
    const uint2 raw = *(const uint2*)(packed + e0 / 2);
    const float scale =
        ps_block_absmax(absmax_f32, absmax_q, nested_absmax, nested_code, nested_blocksize, offset, e0 / blocksize);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const ps_u32 byte = ((j < 4 ? raw.x : raw.y) >> (8 * (j & 3))) & 0xffu;
      v[2 * j] = __fmul_rn(code_shared[byte >> 4], scale);
      v[2 * j + 1] = __fmul_rn(code_shared[byte & 15], scale);
    }
  } else {
    ps_i64 cached_block = -1;
    float scale = 0.f;
#pragma unroll
    for (int j = 0; j < PS_DQ_PER_THREAD; ++j) {
      v[j] = 0.f;
      if (j < count) {
        const ps_i64 e = e0 + j;
        if (e / blocksize != cached_block) {
          cached_block = e / blocksize;
          scale = ps_block_absmax(absmax_f32, absmax_q, nested_absmax, nested_code, nested_blocksize, offset,
                                  cached_block);
        }
        const ps_u32 byte = packed[e / 2];
        v[j] = __fmul_rn(code_shared[(e & 1) == 0 ? (byte >> 4) : (byte & 15)], scale);
      }
    }
  }
  __align__(16) T converted[PS_DQ_PER_THREAD];
#pragma unroll
  for (int j = 0; j < PS_DQ_PER_THREAD; ++j) converted[j] = Tr::from_float(v[j]);
  T* target = out + e0;
  if (count == PS_DQ_PER_THREAD && (((ps_u64)target) & 15) == 0) {
#pragma unroll
    for (int j = 0; j < PS_DQ_PER_THREAD; j += 16 / (int)sizeof(T)) {
      *(uint4*)(target + j) = *(const uint4*)(converted + j);
    }
  } else {
    for (int j = 0; j < count; ++j) target[j] = converted[j];
  }
}

// Pass 2 (same stream, so after pass 1): each distinct delta position recomputes its fp32 dequantised value, adds
// its run of (sorted, possibly repeated) delta values in index order, and overwrites the output with one rounding.
// O(k) threads, no search: this is what keeps pass 1 a pure stream.
template <class Tr, class Idx>
__device__ __forceinline__ void dequant_fixup_body(const ps_u8* packed, const float* absmax_f32,
                                                   const ps_u8* absmax_q, const float* code, ps_i64 blocksize,
                                                   const float* nested_absmax, const float* nested_code,
                                                   ps_i64 nested_blocksize, float offset, const Idx* indices,
                                                   const float* values, ps_i64 k, typename Tr::T* out) {
  const ps_i64 e = (ps_i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= k) return;
  const ps_i64 position = (ps_i64)indices[e];
  if (e > 0 && (ps_i64)indices[e - 1] == position) return;  // not the head of its run: the head adds it
  const float scale = ps_block_absmax(absmax_f32, absmax_q, nested_absmax, nested_code, nested_blocksize, offset,
                                      position / blocksize);
  const ps_u32 byte = packed[position / 2];
  float v = __fmul_rn(code[(position & 1) == 0 ? (byte >> 4) : (byte & 15)], scale);
  for (ps_i64 j = e; j < k && (ps_i64)indices[j] == position; ++j) v = __fadd_rn(v, values[j]);
  out[position] = Tr::from_float(v);
}

// ---- extern "C" entry points (stable names for CuPy) -------------------------------------------------------------

#define PS_SCATTER_KERNEL(NAME, TR, IDX)                                                                        \
  extern "C" __global__ void __launch_bounds__(PS_THREADS)                                                     \
      NAME(TR::T* dense, ps_i64 cols, ps_i64 stride_row, ps_i64 stride_col, const IDX* indices,               \
           const TR::T* values, ps_i64 k) {                                                                    \
    scatter_add_body<TR, IDX>(dense, cols, stride_row, stride_col, indices, values, k);                        \
  }

#define PS_SDDMM_KERNEL(NAME, TR, IDX)                                                                          \
  extern "C" __global__ void __launch_bounds__(PS_THREADS)                                                     \
      NAME(const TR::T* grad, ps_i64 gst, ps_i64 gsf, const TR::T* input, ps_i64 ist, ps_i64 isf,             \
           ps_i64 num_tokens, ps_i64 in_features, const IDX* indices, ps_i64 k, ps_i64 tokens_per_split,      \
           TR::Acc* partial) {                                                                                 \
    sddmm_body<TR, IDX>(grad, gst, gsf, input, ist, isf, num_tokens, in_features, indices, k,                  \
                        tokens_per_split, partial);                                                            \
  }

#define PS_DEQUANT_KERNEL(NAME, TR, IDX)                                                                        \
  extern "C" __global__ void __launch_bounds__(PS_THREADS)                                                     \
      NAME(const ps_u8* packed, const float* absmax_f32, const ps_u8* absmax_q, const float* code,            \
           ps_i64 blocksize, const float* nested_absmax, const float* nested_code, ps_i64 nested_blocksize,    \
           float offset, ps_i64 numel, const IDX* indices, const float* values, ps_i64 k, TR::T* out) {       \
    dequant_body<TR>(packed, absmax_f32, absmax_q, code, blocksize, nested_absmax, nested_code,                \
                     nested_blocksize, offset, numel, out);                                                    \
  }

#define PS_DEQUANT_FIXUP_KERNEL(NAME, TR, IDX)                                                                  \
  extern "C" __global__ void __launch_bounds__(PS_THREADS)                                                     \
      NAME(const ps_u8* packed, const float* absmax_f32, const ps_u8* absmax_q, const float* code,            \
           ps_i64 blocksize, const float* nested_absmax, const float* nested_code, ps_i64 nested_blocksize,    \
           float offset, ps_i64 numel, const IDX* indices, const float* values, ps_i64 k, TR::T* out) {       \
    dequant_fixup_body<TR, IDX>(packed, absmax_f32, absmax_q, code, blocksize, nested_absmax, nested_code,     \
                                nested_blocksize, offset, indices, values, k, out);                            \
  }

#define PS_FOR_INDEX_TYPES(MACRO, PREFIX, TR, SUFFIX) \
  MACRO(PREFIX##_##SUFFIX##_i32, TR, int)             \
  MACRO(PREFIX##_##SUFFIX##_i64, TR, ps_i64)

PS_FOR_INDEX_TYPES(PS_SCATTER_KERNEL, ps_scatter_add, PsF32, f32)
PS_FOR_INDEX_TYPES(PS_SCATTER_KERNEL, ps_scatter_add, PsF64, f64)
PS_FOR_INDEX_TYPES(PS_SCATTER_KERNEL, ps_scatter_add, PsF16, f16)
PS_FOR_INDEX_TYPES(PS_SCATTER_KERNEL, ps_scatter_add, PsBF16, bf16)
PS_FOR_INDEX_TYPES(PS_SDDMM_KERNEL, ps_sddmm_gather, PsF32, f32)
PS_FOR_INDEX_TYPES(PS_SDDMM_KERNEL, ps_sddmm_gather, PsF64, f64)
PS_FOR_INDEX_TYPES(PS_SDDMM_KERNEL, ps_sddmm_gather, PsF16, f16)
PS_FOR_INDEX_TYPES(PS_SDDMM_KERNEL, ps_sddmm_gather, PsBF16, bf16)
PS_FOR_INDEX_TYPES(PS_DEQUANT_KERNEL, ps_dequant_scatter, PsF32, f32)
PS_FOR_INDEX_TYPES(PS_DEQUANT_KERNEL, ps_dequant_scatter, PsF16, f16)
PS_FOR_INDEX_TYPES(PS_DEQUANT_KERNEL, ps_dequant_scatter, PsBF16, bf16)
PS_FOR_INDEX_TYPES(PS_DEQUANT_FIXUP_KERNEL, ps_dequant_fixup, PsF32, f32)
PS_FOR_INDEX_TYPES(PS_DEQUANT_FIXUP_KERNEL, ps_dequant_fixup, PsF16, f16)
PS_FOR_INDEX_TYPES(PS_DEQUANT_FIXUP_KERNEL, ps_dequant_fixup, PsBF16, bf16)

extern "C" __global__ void __launch_bounds__(PS_THREADS)
    ps_reduce_splits_f32(const float* partial, ps_i64 splits, ps_i64 k, float* out) {
  reduce_splits_body<float>(partial, splits, k, out);
}
extern "C" __global__ void __launch_bounds__(PS_THREADS)
    ps_reduce_splits_f64(const double* partial, ps_i64 splits, ps_i64 k, double* out) {
  reduce_splits_body<double>(partial, splits, k, out);
}

// ---- host launchers (not seen by NVRTC) ----------------------------------------------------------------------------

#ifndef __CUDACC_RTC__

namespace peft_sparse_cuda {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

dim3 blocks_for(int64_t count) { return dim3((unsigned)ceil_div(count, PS_THREADS)); }

}  // namespace

cudaError_t scatter_add(void* dense, DType dtype, int64_t cols, int64_t stride_row, int64_t stride_col,
                        const void* indices, bool indices_int64, const void* values, int64_t num_entries,
                        cudaStream_t stream) {
  if (num_entries == 0) return cudaSuccess;
  const dim3 grid = blocks_for(num_entries);
#define PS_LAUNCH_SCATTER(SUFFIX, T)                                                                        \
  if (indices_int64)                                                                                        \
    ps_scatter_add_##SUFFIX##_i64<<<grid, PS_THREADS, 0, stream>>>((T*)dense, cols, stride_row, stride_col, \
                                                                   (const ps_i64*)indices, (const T*)values, \
                                                                   num_entries);                            \
  else                                                                                                      \
    ps_scatter_add_##SUFFIX##_i32<<<grid, PS_THREADS, 0, stream>>>((T*)dense, cols, stride_row, stride_col, \
                                                                   (const int*)indices, (const T*)values,   \
                                                                   num_entries);
  switch (dtype) {
    case DType::Float32: PS_LAUNCH_SCATTER(f32, float) break;
    case DType::Float64: PS_LAUNCH_SCATTER(f64, double) break;
    case DType::Float16: PS_LAUNCH_SCATTER(f16, ps_u16) break;
    case DType::BFloat16: PS_LAUNCH_SCATTER(bf16, ps_u16) break;
  }
#undef PS_LAUNCH_SCATTER
  return cudaGetLastError();
}

cudaError_t sddmm_gather(const void* grad_output, int64_t grad_stride_token, int64_t grad_stride_feature,
                         const void* input, int64_t input_stride_token, int64_t input_stride_feature, DType dtype,
                         int64_t num_tokens, int64_t in_features, const void* indices, bool indices_int64,
                         int64_t num_entries, const SddmmPlan& plan, void* workspace, void* out,
                         cudaStream_t stream) {
  if (num_entries == 0) return cudaSuccess;
  const bool fp64 = dtype == DType::Float64;
  if (num_tokens == 0) return cudaMemsetAsync(out, 0, num_entries * (fp64 ? 8 : 4), stream);
  void* partial = plan.splits > 1 ? workspace : out;
  const dim3 grid((unsigned)ceil_div(num_entries, PS_WARPS_PER_BLOCK), (unsigned)plan.splits);
#define PS_LAUNCH_SDDMM(SUFFIX, T, ACC)                                                                       \
  {                                                                                                           \
    if (indices_int64)                                                                                        \
      ps_sddmm_gather_##SUFFIX##_i64<<<grid, PS_THREADS, 0, stream>>>(                         \
          (const T*)grad_output, grad_stride_token, grad_stride_feature, (const T*)input, input_stride_token,  \
          input_stride_feature, num_tokens, in_features, (const ps_i64*)indices, num_entries,                  \
          plan.tokens_per_split, (ACC*)partial);                                                               \
    else                                                                                                      \
      ps_sddmm_gather_##SUFFIX##_i32<<<grid, PS_THREADS, 0, stream>>>(                         \
          (const T*)grad_output, grad_stride_token, grad_stride_feature, (const T*)input, input_stride_token,  \
          input_stride_feature, num_tokens, in_features, (const int*)indices, num_entries,                     \
          plan.tokens_per_split, (ACC*)partial);                                                               \
  }
  switch (dtype) {
    case DType::Float32: PS_LAUNCH_SDDMM(f32, float, float) break;
    case DType::Float64: PS_LAUNCH_SDDMM(f64, double, double) break;
    case DType::Float16: PS_LAUNCH_SDDMM(f16, ps_u16, float) break;
    case DType::BFloat16: PS_LAUNCH_SDDMM(bf16, ps_u16, float) break;
  }
#undef PS_LAUNCH_SDDMM
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || plan.splits == 1) return status;
  if (fp64)
    ps_reduce_splits_f64<<<blocks_for(num_entries), PS_THREADS, 0, stream>>>((const double*)workspace, plan.splits,
                                                                              num_entries, (double*)out);
  else
    ps_reduce_splits_f32<<<blocks_for(num_entries), PS_THREADS, 0, stream>>>((const float*)workspace, plan.splits,
                                                                              num_entries, (float*)out);
  return cudaGetLastError();
}

cudaError_t dequant_scatter(const uint8_t* packed, const void* absmax, const float* code, int64_t blocksize,
                            const float* nested_absmax, const float* nested_code, int64_t nested_blocksize,
                            float offset, int64_t numel, const void* indices, bool indices_int64,
                            const float* values, int64_t num_entries, void* out, DType out_dtype,
                            cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const bool nested = nested_absmax != nullptr;
  const float* absmax_f32 = nested ? nullptr : (const float*)absmax;
  const ps_u8* absmax_q = nested ? (const ps_u8*)absmax : nullptr;
  const dim3 grid((unsigned)ceil_div(numel, PS_DQ_TILE));
#define PS_LAUNCH_DEQUANT(SUFFIX, T)                                                                         \
  if (indices_int64) {                                                                                       \
    ps_dequant_scatter_##SUFFIX##_i64<<<grid, PS_THREADS, 0, stream>>>(                                       \
        packed, absmax_f32, absmax_q, code, blocksize, nested_absmax, nested_code, nested_blocksize, offset,  \
        numel, (const ps_i64*)indices, values, num_entries, (T*)out);                                         \
    if (num_entries > 0)                                                                                     \
      ps_dequant_fixup_##SUFFIX##_i64<<<blocks_for(num_entries), PS_THREADS, 0, stream>>>(                    \
          packed, absmax_f32, absmax_q, code, blocksize, nested_absmax, nested_code, nested_blocksize, offset, \
          numel, (const ps_i64*)indices, values, num_entries, (T*)out);                                       \
  } else {                                                                                                   \
    ps_dequant_scatter_##SUFFIX##_i32<<<grid, PS_THREADS, 0, stream>>>(                                       \
        packed, absmax_f32, absmax_q, code, blocksize, nested_absmax, nested_code, nested_blocksize, offset,  \
        numel, (const int*)indices, values, num_entries, (T*)out);                                            \
    if (num_entries > 0)                                                                                     \
      ps_dequant_fixup_##SUFFIX##_i32<<<blocks_for(num_entries), PS_THREADS, 0, stream>>>(                    \
          packed, absmax_f32, absmax_q, code, blocksize, nested_absmax, nested_code, nested_blocksize, offset, \
          numel, (const int*)indices, values, num_entries, (T*)out);                                          \
  }
  switch (out_dtype) {
    case DType::Float32: PS_LAUNCH_DEQUANT(f32, float) break;
    case DType::Float16: PS_LAUNCH_DEQUANT(f16, ps_u16) break;
    case DType::BFloat16: PS_LAUNCH_DEQUANT(bf16, ps_u16) break;
    case DType::Float64: return cudaErrorInvalidValue;
  }
#undef PS_LAUNCH_DEQUANT
  return cudaGetLastError();
}

}  // namespace peft_sparse_cuda

#endif  // __CUDACC_RTC__
