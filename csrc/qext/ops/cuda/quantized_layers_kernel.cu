// CUDA kernels of the integer-only layers quantized_linear and quantized_conv2d (schemas in
// ops/quantized_layers.cpp). Arguments are checked and the per-channel parameters derived by
// ops/common/int8_args.h exactly as the CPU kernels do, so errors are the same on either device and
// the results are bit-identical to the CPU kernels (same int32 accumulators, same fixed-point
// requantization, same float32 multiply).
//
// Registered at QuantizedCUDA (the inputs are per-tensor quantized CUDA tensors) and at CUDA (a
// plain CUDA tensor as input gets int8_args' "must be a per-tensor quantized tensor" message, as on
// the CPU).
//
// GEMM C = epilogue(A (M x K uint8) x W^T) on the tensor cores (sm_80+):
// mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32, block tiles BM x BN x 64 with a STAGES-deep
// cp.async pipeline, warp tiles (BM / WARPS_M) x (BN / WARPS_N).
// * A (row-major, lda a multiple of 16 bytes) is copied to shared memory in 16-byte chunks, rows of
//   64 bytes, chunk index XOR-swizzled with (row / 2) % 4 so that ldmatrix.x4 reads conflict-free;
//   ldmatrix.x4 gives the m16n8k32 A fragment directly (8-bit data seen as 8 x 8 b16 matrices:
//   thread l gets bytes 4 (l % 4) .. 4 (l % 4) + 3 of row l / 4 = 4 consecutive k of one row).
// * W is the CPU packed layout (qgemm.h) read as is: a 16-column block of one 64-k tile is 1 KB
//   (16 groups of 64 bytes; group g holds W[n][4 g .. 4 g + 3] at bytes 4 n .. 4 n + 3), so each
//   32-bit word is the 4 consecutive k of one column the m16n8k32 B fragment wants. A thread loads
//   one 16-byte chunk (4 columns of one group, ld.shared.v4) and uses its 4 words as the B
//   fragments of 4 different n8 MMA tiles: in a warp's 32-column slice, MMA tile j's column n is
//   the actual column 4 n + j. Then each thread's accumulators cover 8 consecutive output columns
//   (the epilogue stores 8 bytes / 2 float4 at once). Shared memory rows of 128 bytes (2 groups)
//   have their chunk index XOR-swizzled by 2 on odd rows: the quarter-warp phases of those loads
//   are conflict-free.
// * int8 (torch.qint8) activations are flipped to uint8 levels (x ^ 0x80) in the A fragments, or
//   in the copy / im2col kernels that feed the GEMM; the epilogue uses the uint8 zero point.
// * Epilogue (fused): acc - a_zero_point * row_sums[n] + bias[n] (int32, wrapping like the CPU's
//   exact int32 arithmetic), then requantize() of qgemm.h (duplicated bit for bit in
//   requantize_fixed) + clamp, or float(acc) * scale[n] (+ ReLU).
// Convolutions: an im2col kernel writes the uint8 [rows, groups * K_g16] matrix in (kh, kw, c) tap
// order (padded taps = the input zero point; K_g16 = K_g rounded up to 16), in row chunks of
// bounded size, and the GEMM runs all groups at once (blockIdx.z = group; group g's packed weight
// sits at g * packed_weight_bytes(OC / g, K_g)). 1 x 1 / stride 1 / no padding convolutions of a
// channels_last input with C / groups a multiple of 16 read the input directly. Depthwise
// convolutions (groups == C == OC, C > 1; tap-major weight w[(kh * KW + kw) * C + c]) run a direct
// kernel.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "qext/kernels/qconv.h"
#include "qext/kernels/qgemm.h"
#include "qext/ops/common/int8_args.h"

namespace qext::ops {
namespace {

using detail::Int8LayerParams;
using detail::Int8Output;

constexpr int kElementwiseThreads = 256;
// Bytes of one im2col chunk (the conv GEMM runs over the rows in chunks of at most this size).
constexpr int64_t kIm2colBudget = int64_t{128} << 20;

// ---- Epilogue ---------------------------------------------------------------------------------

// Per-channel parameters on the device; channel = group * N + column.
struct Epilogue {
  const int32_t* row_sums;  // [channels]
  const int32_t* bias;      // [channels] or nullptr
  const int32_t* mult;      // [channels] FixedPointMultiplier::multiplier (8-bit output)
  const int32_t* expo;      // [channels] FixedPointMultiplier::exponent (8-bit output)
  const int32_t* offset;    // [channels] FixedPointMultiplier::offset (8-bit output)
  const float* scale;       // [channels] (float output)
  int32_t a_zero_point;     // of the uint8 levels
  int32_t out_zero_point;
  int32_t out_min;
  int32_t out_max;
  bool relu;
};

// qext::kernels::requantize (qgemm.h), bit for bit:
//   x = saturate_int32(acc * 2^max(exponent, 0))
//   x = floor((int64(x) * multiplier + 2^(n - 1) + offset) / 2^n), n = 31 + max(-exponent, 0)
//   q = clamp(int64(x) + out_zero_point, out_min, out_max)
__host__ __device__ __forceinline__ int32_t requantize_fixed(int32_t acc, int32_t multiplier,
                                                             int32_t exponent, int32_t offset,
                                                             int32_t out_zero_point,
                                                             int32_t out_min, int32_t out_max) {
  int64_t x = acc;
  if (exponent > 0) {
    const int e = exponent < 31 ? exponent : 31;  // as the CPU: e >= 31 saturates all the same
    x *= int64_t{1} << e;
    x = x < INT32_MIN ? INT32_MIN : (x > INT32_MAX ? INT32_MAX : x);
  }
  const int n = 31 + (exponent >= 0 ? 0 : (exponent > -31 ? -exponent : 31));  // as the CPU
  x = (x * multiplier + (int64_t{1} << (n - 1)) + offset) >> n;  // arithmetic shift: floor
  x += out_zero_point;
  x = x < out_min ? out_min : (x > out_max ? out_max : x);
  return static_cast<int32_t>(x);
}

// bias[ch] - a_zero_point * row_sums[ch], in wrapping int32 arithmetic (the exact sum the CPU
// computes fits int32, so wrapping intermediate values give the same final accumulator).
__device__ __forceinline__ uint32_t channel_offset(const Epilogue& ep, int64_t ch) {
  const uint32_t b = ep.bias != nullptr ? static_cast<uint32_t>(__ldg(ep.bias + ch)) : 0u;
  return b -
         static_cast<uint32_t>(ep.a_zero_point) * static_cast<uint32_t>(__ldg(ep.row_sums + ch));
}

// The stored byte: the low 8 bits of the requantized level (uint8 or int8 levels alike).
__device__ __forceinline__ uint32_t requant_byte(const Epilogue& ep, int32_t acc, int32_t mult,
                                                 int32_t expo, int32_t offset) {
  const int32_t q =
      requantize_fixed(acc, mult, expo, offset, ep.out_zero_point, ep.out_min, ep.out_max);
  return static_cast<uint32_t>(q) & 0xffu;
}

// float(acc) * scale in float32 (one rounding, no FMA contraction), then ReLU.
__device__ __forceinline__ float scale_float(const Epilogue& ep, int32_t acc, float scale) {
  float y = __fmul_rn(__int2float_rn(acc), scale);
  if (ep.relu) y = y > 0.f ? y : 0.f;  // as the CPU: -0 becomes +0
  return y;
}

// ---- PTX wrappers -------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (nothing is read then).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d += a (16 x 32 uint8, row-major) * b (32 x 8 int8, column-major).
__device__ __forceinline__ void mma_u8s8(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- GEMM ---------------------------------------------------------------------------------------

constexpr int kTileK = 64;                // k per pipeline stage (= kernels::kPackK)
constexpr int kBlockBytes = 16 * kTileK;  // one packed 16-column block of one k tile
constexpr int kGroupM = 8;                // tile rows per raster group (L2 reuse)
static_assert(kernels::kPackK == kTileK && kernels::kPackN == 16, "packed weight layout changed");

struct GemmArgs {
  const uint8_t* a;  // A of group 0: row m at a + m * lda
  int64_t lda;       // multiple of 16; a is 16-byte aligned
  int64_t a_group;   // bytes between the A columns of consecutive groups (multiple of 16)
  int a_cols;        // readable columns of A per group (multiple of 16); beyond them A reads 0
  const int8_t* w;   // packed weight of group 0 (16-byte aligned)
  int64_t w_group;   // bytes between the packed weights of consecutive groups
  void* c;           // output of group 0: element (m, n) at c + m * ldc + n
  int64_t ldc;       // elements
  int64_t c_group;   // elements between the outputs of consecutive groups
  int M;
  int N;        // columns per group
  int k_tiles;  // packed_k(K) / 64
  Epilogue ep;
};

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
struct GemmConfig {
  static constexpr int kBM = BM, kBN = BN, kStages = STAGES;
  static constexpr int kWarpsN = WARPS_N;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kWM = BM / WARPS_M;  // warp tile rows
  static constexpr int kWN = BN / WARPS_N;  // warp tile columns
  static constexpr int kMT = kWM / 16;      // m16 MMA tiles per warp
  static constexpr int kNH = kWN / 32;      // 32-column slices (4 n8 MMA tiles each) per warp
  static constexpr int kStageA = BM * kTileK;
  static constexpr int kStageB = BN * kTileK;
  static constexpr int kSmemBytes = STAGES * (kStageA + kStageB);
  static_assert(kWM % 16 == 0 && kWN % 32 == 0, "warp tile must be 16 x 32 multiples");
  static_assert(STAGES >= 2, "pipeline needs two stages");
  static_assert((BM * 4) % kThreads == 0 && (BN * 4) % kThreads == 0,
                "16-byte chunks of a stage must split evenly over the threads");
};

using LargeConfig = GemmConfig<128, 128, 2, 2, 4>;  // warp 64 x 64, 64 KB shared memory
using SmallConfig = GemmConfig<64, 64, 2, 2, 4>;    // warp 32 x 32, 32 KB
using TinyConfig = GemmConfig<16, 64, 1, 2, 4>;     // warp 16 x 32, 20 KB (M <= 16, small GEMMs)

template <typename Cfg, bool kFlipA, bool kFloatOut>
__global__ void __launch_bounds__(Cfg::kThreads) qgemm_u8s8_kernel(const GemmArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async / ldmatrix / m16n8k32 need sm_80; the host refuses older devices
#else
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, STAGES = Cfg::kStages;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int MT = Cfg::kMT, NH = Cfg::kNH;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* const sA = smem;
  uint8_t* const sB = smem + STAGES * Cfg::kStageA;

  const int M = args.M, N = args.N;
  // Grouped raster: kGroupM tile rows sweep the tile columns together, so a wave of blocks
  // shares both A rows and weight columns in L2.
  const int tiles_m = (M + BM - 1) / BM;
  const int tiles_n = (N + BN - 1) / BN;
  const int pid = blockIdx.x;
  const int per_group = kGroupM * tiles_n;
  const int first_m = (pid / per_group) * kGroupM;
  const int group_rows = min(tiles_m - first_m, kGroupM);
  const int tm = first_m + (pid % per_group) % group_rows;
  const int tn = (pid % per_group) / group_rows;
  const int m0 = tm * BM, n0 = tn * BN;

  const int z = blockIdx.z;
  const uint8_t* const a = args.a + z * args.a_group;
  const int8_t* const w = args.w + z * args.w_group;
  const int64_t lda = args.lda;
  const int a_cols = args.a_cols;
  const int n_blocks = (N + 15) / 16;  // packed 16-column blocks of this group
  const int64_t block_stride = static_cast<int64_t>(args.k_tiles) * kBlockBytes;
  const int tid = threadIdx.x;

  auto load_tile = [&](int stage, int kt) {
    const uint32_t dA = smem_addr(sA + stage * Cfg::kStageA);
#pragma unroll
    for (int it = 0; it < BM * 4 / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int row = i >> 2, kc = i & 3;
      const int gm = m0 + row, gk = kt * kTileK + kc * 16;
      const bool valid = gm < M && gk < a_cols;
      const uint8_t* src = valid ? a + gm * lda + gk : a;
      cp_async_16(dA + row * kTileK + ((kc ^ ((row >> 1) & 3)) << 4), src, valid);
    }
    const uint32_t dB = smem_addr(sB + stage * Cfg::kStageB);
#pragma unroll
    for (int it = 0; it < BN * 4 / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int blk = i >> 6, within = i & 63;  // 64 chunks per 1 KB block
      const int g = within >> 2, q = within & 3;
      const int gb = n0 / 16 + blk;
      const bool valid = gb < n_blocks;
      const int8_t* src = valid ? w + gb * block_stride + kt * kBlockBytes + within * 16 : w;
      const int r = g >> 1;
      const int pos = (((g & 1) << 2) | q) ^ ((r & 1) << 1);
      cp_async_16(dB + blk * kBlockBytes + r * 128 + (pos << 4), src, valid);
    }
  };

  const int warp = tid >> 5, lane = tid & 31;
  const int wm0 = (warp / Cfg::kWarpsN) * Cfg::kWM;
  const int wn0 = (warp % Cfg::kWarpsN) * Cfg::kWN;

  int32_t acc[MT][NH][4][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < NH; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][h][j][e] = 0;

  const int k_tiles = args.k_tiles;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_tile(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt landed for all threads; stage (kt - 1) % STAGES is free
    {
      const int next = kt + STAGES - 1;
      if (next < k_tiles) load_tile(next % STAGES, next);
      cp_async_commit();
    }
    const int stage = kt % STAGES;
    const uint8_t* const tA = sA + stage * Cfg::kStageA;
    const uint8_t* const tB = sB + stage * Cfg::kStageB;
#pragma unroll
    for (int kk = 0; kk < kTileK / 32; ++kk) {
      uint32_t af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // Lanes 0-7: rows 0-7, k 0-15 (a0); 8-15: rows 8-15, k 0-15 (a1); 16-23: rows 0-7,
        // k 16-31 (a2); 24-31: rows 8-15, k 16-31 (a3).
        const int row = wm0 + mt * 16 + (lane & 15);
        const int kc = kk * 2 + (lane >> 4);
        ldmatrix_x4(af[mt], smem_addr(tA + row * kTileK + ((kc ^ ((row >> 1) & 3)) << 4)));
        if constexpr (kFlipA) {
#pragma unroll
          for (int e = 0; e < 4; ++e) af[mt][e] ^= 0x80808080u;
        }
      }
      // B: lane l loads group kk * 8 + half * 4 + l % 4 of columns 4 (l / 4) .. 4 (l / 4) + 3 of
      // the slice: word j is the b (half 0: k 0-15, half 1: k 16-31) of MMA tile j, column l / 4.
      uint32_t bf[NH][2][4];
#pragma unroll
      for (int h = 0; h < NH; ++h) {
        const int c4 = lane >> 2;
        const int blk = (wn0 + 32 * h) / 16 + (c4 >> 2);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int g = kk * 8 + half * 4 + (lane & 3);
          const int r = g >> 1;
          const int pos = (((g & 1) << 2) | (c4 & 3)) ^ ((r & 1) << 1);
          const uint4 v =
              *reinterpret_cast<const uint4*>(tB + blk * kBlockBytes + r * 128 + (pos << 4));
          bf[h][half][0] = v.x;
          bf[h][half][1] = v.y;
          bf[h][half][2] = v.z;
          bf[h][half][3] = v.w;
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < NH; ++h)
#pragma unroll
          for (int j = 0; j < 4; ++j) mma_u8s8(acc[mt][h][j], af[mt], bf[h][0][j], bf[h][1][j]);
    }
  }
  cp_async_wait<0>();

  // Epilogue. Accumulator e of MMA tile j (slice h, m16 tile mt): row gid (e < 2) or gid + 8,
  // MMA column 2 t + (e & 1) = actual column 8 t + 4 (e & 1) + j of the slice.
  const Epilogue& ep = args.ep;
  const int t = lane & 3, gid = lane >> 2;
  const int64_t ch0 = static_cast<int64_t>(z) * N;
#pragma unroll
  for (int h = 0; h < NH; ++h) {
    const int col0 = n0 + wn0 + 32 * h + 8 * t;
    // This thread's 8 columns' parameters, loaded once for all its rows.
    uint32_t offset[8];
    int32_t mult[8], expo[8], round_offset[8];
    float scale[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const bool in = col0 + e < N;
      const int64_t ch = ch0 + col0 + e;
      offset[e] = in ? channel_offset(ep, ch) : 0u;
      if constexpr (kFloatOut) {
        scale[e] = in ? __ldg(ep.scale + ch) : 0.f;
        mult[e] = expo[e] = round_offset[e] = 0;
      } else {
        mult[e] = in ? __ldg(ep.mult + ch) : 0;
        expo[e] = in ? __ldg(ep.expo + ch) : 0;
        round_offset[e] = in ? __ldg(ep.offset + ch) : 0;
        scale[e] = 0.f;
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        const int row = m0 + wm0 + mt * 16 + gid + 8 * rh;
        if (row >= M) continue;
        int32_t v[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          v[j] = static_cast<int32_t>(static_cast<uint32_t>(acc[mt][h][j][2 * rh]) + offset[j]);
          v[4 + j] = static_cast<int32_t>(static_cast<uint32_t>(acc[mt][h][j][2 * rh + 1]) +
                                          offset[4 + j]);
        }
        const int64_t out_index = z * args.c_group + row * args.ldc + col0;
        const bool full = col0 + 8 <= N;
        if constexpr (kFloatOut) {
          float* dst = static_cast<float*>(args.c) + out_index;
          float y[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) y[e] = scale_float(ep, v[e], scale[e]);
          if (full && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
            reinterpret_cast<float4*>(dst)[0] = make_float4(y[0], y[1], y[2], y[3]);
            reinterpret_cast<float4*>(dst)[1] = make_float4(y[4], y[5], y[6], y[7]);
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e)
              if (col0 + e < N) dst[e] = y[e];
          }
        } else {
          uint8_t* dst = static_cast<uint8_t*>(args.c) + out_index;
          uint32_t y[8];
#pragma unroll
          for (int e = 0; e < 8; ++e)
            y[e] = requant_byte(ep, v[e], mult[e], expo[e], round_offset[e]);
          if (full && (reinterpret_cast<uintptr_t>(dst) & 7) == 0) {
            uint2 packed;
            packed.x = y[0] | (y[1] << 8) | (y[2] << 16) | (y[3] << 24);
            packed.y = y[4] | (y[5] << 8) | (y[6] << 16) | (y[7] << 24);
            *reinterpret_cast<uint2*>(dst) = packed;
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e)
              if (col0 + e < N) dst[e] = static_cast<uint8_t>(y[e]);
          }
        }
      }
    }
  }
#endif
}

template <typename Cfg, bool kFlipA, bool kFloatOut>
void launch_gemm_config(const GemmArgs& args, int groups, cudaStream_t stream) {
  const auto kernel = qgemm_u8s8_kernel<Cfg, kFlipA, kFloatOut>;
  if constexpr (Cfg::kSmemBytes > 48 * 1024) {
    // Opt in to more than 48 KB of dynamic shared memory, once per device.
    static std::atomic<uint64_t> done{0};
    const int device = c10::cuda::current_device();
    const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
    if (bit == 0 || (done.load() & bit) == 0) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          Cfg::kSmemBytes));
      done.fetch_or(bit);
    }
  }
  const int64_t tiles = static_cast<int64_t>((args.M + Cfg::kBM - 1) / Cfg::kBM) *
                        ((args.N + Cfg::kBN - 1) / Cfg::kBN);
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max() && groups <= 65535,
              "quantized layer (CUDA): too many GEMM tiles (", tiles, " x ", groups, " groups)");
  kernel<<<dim3(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(groups)), Cfg::kThreads,
           Cfg::kSmemBytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kFlipA, bool kFloatOut>
void launch_gemm_typed(const GemmArgs& args, int groups, cudaStream_t stream) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t large_tiles =
      static_cast<int64_t>((args.M + 127) / 128) * ((args.N + 127) / 128) * groups;
  const int64_t small_tiles =
      static_cast<int64_t>((args.M + 63) / 64) * ((args.N + 63) / 64) * groups;
  // The largest tiles that still give the GPU about a wave of blocks; 16-row tiles for
  // matrix-vector-like products (M <= 16) and for small GEMMs that 64 x 64 tiles leave mostly idle.
  if (args.M > 16 && large_tiles >= sms) {
    launch_gemm_config<LargeConfig, kFlipA, kFloatOut>(args, groups, stream);
  } else if (args.M > 16 && (small_tiles >= sms / 2 || args.M > 256)) {
    launch_gemm_config<SmallConfig, kFlipA, kFloatOut>(args, groups, stream);
  } else {
    launch_gemm_config<TinyConfig, kFlipA, kFloatOut>(args, groups, stream);
  }
}

void launch_gemm(const GemmArgs& args, int groups, bool flip_a, bool float_out,
                 cudaStream_t stream) {
  if (args.M == 0) return;
  if (flip_a) {
    if (float_out) {
      launch_gemm_typed<true, true>(args, groups, stream);
    } else {
      launch_gemm_typed<true, false>(args, groups, stream);
    }
  } else {
    if (float_out) {
      launch_gemm_typed<false, true>(args, groups, stream);
    } else {
      launch_gemm_typed<false, false>(args, groups, stream);
    }
  }
}

// ---- A preparation
// --------------------------------------------------------------------------------

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline unsigned elementwise_blocks(int64_t work) {
  const int64_t cap =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min(cap, (work + kElementwiseThreads - 1) / kElementwiseThreads)));
}

// out[m][k] = k < K ? in[m * K + k] ^ flip : 0 for k < ldo (ldo a multiple of 4); 4 bytes a thread.
__global__ void pad_rows_kernel(const uint8_t* __restrict__ in, int64_t M, int64_t K,
                                uint8_t* __restrict__ out, int64_t ldo, uint8_t flip) {
  const int64_t words_per_row = ldo / 4;
  const int64_t total = M * words_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / words_per_row;
    const int64_t k0 = (i - m * words_per_row) * 4;
    uint32_t word = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t k = k0 + b;
      const uint32_t v = k < K ? static_cast<uint32_t>(in[m * K + k] ^ flip) : 0u;
      word |= v << (8 * b);
    }
    *reinterpret_cast<uint32_t*>(out + m * ldo + k0) = word;
  }
}

// The convolution shape as the kernels read it (qext::kernels::Conv2dGeometry plus the GEMM's K
// per group).
struct ConvShape {
  int64_t batch, channels, height, width;
  int64_t out_channels, out_height, out_width;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t groups;
  int64_t kg;  // kh * kw * channels / groups
};

ConvShape conv_shape(const kernels::Conv2dGeometry& g) {
  ConvShape s{};
  s.batch = g.batch;
  s.channels = g.in_channels;
  s.height = g.in_h;
  s.width = g.in_w;
  s.out_channels = g.out_channels;
  s.out_height = g.out_h;
  s.out_width = g.out_w;
  s.kh = g.kernel_h;
  s.kw = g.kernel_w;
  s.sh = g.stride_h;
  s.sw = g.stride_w;
  s.ph = g.pad_h;
  s.pw = g.pad_w;
  s.dh = g.dilation_h;
  s.dw = g.dilation_w;
  s.groups = g.groups;
  s.kg = g.group_k();
  return s;
}

struct Im2colArgs {
  const uint8_t* in;
  int64_t sn, sc, sh, sw;  // input strides (bytes = elements)
  ConvShape g;
  int64_t row0, rows;  // output rows (n, oh, ow) of this chunk
  uint8_t* out;        // [rows, groups * kg16]
  int64_t kg16;
  uint8_t flip;
  uint8_t pad;  // uint8 level of a padded tap (the input zero point)
};

// out[r][grp * kg16 + (ky * KW + kx) * Cg + c] = uint8 level of input[n][grp * Cg + c][iy][ix]
// (pad for taps outside the image, 0 for the columns kg .. kg16 - 1); 4 bytes a thread.
__global__ void im2col_kernel(const Im2colArgs p) {
  const ConvShape& g = p.g;
  const int64_t ld = g.groups * p.kg16;
  const int64_t words_per_row = ld / 4;
  const int64_t total = p.rows * words_per_row;
  const int64_t cg = g.channels / g.groups;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / words_per_row;
    const int64_t col0 = (i - r * words_per_row) * 4;
    const int64_t row = p.row0 + r;
    const int64_t ox = row % g.out_width;
    const int64_t oy = (row / g.out_width) % g.out_height;
    const int64_t n = row / (g.out_width * g.out_height);
    const int64_t grp = col0 / p.kg16;  // kg16 % 16 == 0: all 4 bytes in one group
    const uint8_t* const base = p.in + n * p.sn;
    uint32_t word = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t kk = col0 + b - grp * p.kg16;
      uint32_t v = 0;
      if (kk < g.kg) {
        const int64_t tap = kk / cg;
        const int64_t c = grp * cg + (kk - tap * cg);
        const int64_t ky = tap / g.kw, kx = tap - ky * g.kw;
        const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
        const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
        if (iy >= 0 && iy < g.height && ix >= 0 && ix < g.width) {
          v = static_cast<uint32_t>(base[c * p.sc + iy * p.sh + ix * p.sw] ^ p.flip);
        } else {
          v = p.pad;
        }
      }
      word |= v << (8 * b);
    }
    *reinterpret_cast<uint32_t*>(p.out + r * ld + col0) = word;
  }
}

// ---- Depthwise ----------------------------------------------------------------------------------

struct DepthwiseArgs {
  const uint8_t* in;
  int64_t sn, sc, sh, sw;
  ConvShape g;
  const int8_t* w;  // [kh * kw * C], tap-major
  uint8_t* out;     // channels_last: [batch * OH * OW, C]
  uint8_t flip;
  Epilogue ep;
};

// One thread per output (n, oh, ow, c), c fastest. As kernels::depthwise_conv2d_u8s8:
// requantize(bias[c] + sum over the in-image taps of (x - a_zero_point) * w) (row_sums unused).
__global__ void depthwise_kernel(const DepthwiseArgs p) {
  const ConvShape& g = p.g;
  const int64_t C = g.channels;
  const int64_t total = g.batch * g.out_height * g.out_width * C;
  const int32_t zp = p.ep.a_zero_point;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % C;
    const int64_t row = i / C;
    const int64_t ox = row % g.out_width;
    const int64_t oy = (row / g.out_width) % g.out_height;
    const int64_t n = row / (g.out_width * g.out_height);
    const uint8_t* const base = p.in + n * p.sn + c * p.sc;
    // Exact (|sum| < 2^31, checked on the host); uint32 keeps it free of signed overflow anyway.
    uint32_t acc = p.ep.bias != nullptr ? static_cast<uint32_t>(__ldg(p.ep.bias + c)) : 0u;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
      if (iy < 0 || iy >= g.height) continue;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
        if (ix < 0 || ix >= g.width) continue;
        const int32_t x = static_cast<int32_t>(base[iy * p.sh + ix * p.sw] ^ p.flip) - zp;
        acc += static_cast<uint32_t>(x * static_cast<int32_t>(p.w[(ky * g.kw + kx) * C + c]));
      }
    }
    p.out[i] =
        static_cast<uint8_t>(requant_byte(p.ep, static_cast<int32_t>(acc), __ldg(p.ep.mult + c),
                                          __ldg(p.ep.expo + c), __ldg(p.ep.offset + c)));
  }
}

// ---- Host side ----------------------------------------------------------------------------------

void check_device_capability(const char* op) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, op,
              ": the CUDA int8 kernels need compute capability 8.0 or newer, this device (",
              props->name, ") has ", props->major, ".", props->minor);
}

// The per-channel parameters on the device (one pinned host buffer, one asynchronous copy on the
// current stream) and the epilogue reading them; the tensors keep the device buffers alive.
struct DeviceEpilogue {
  at::Tensor params;
  at::Tensor row_sums;
  Epilogue ep;
};

DeviceEpilogue upload_epilogue(const Int8LayerParams& p, const at::Tensor& row_sums,
                               const at::Device& device) {
  const int64_t n = p.out_channels;
  const bool has_bias = !p.bias.empty();
  const int64_t per_channel = (p.output.is_float ? 1 : 3) + (has_bias ? 1 : 0);
  at::Tensor host =
      at::empty({per_channel * n}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  int32_t* h = host.mutable_data_ptr<int32_t>();
  if (p.output.is_float) {
    std::memcpy(h, p.float_scale.data(), n * sizeof(float));
  } else {
    for (int64_t c = 0; c < n; ++c) {
      h[c] = p.multiplier[c].multiplier;
      h[n + c] = p.multiplier[c].exponent;
      h[2 * n + c] = p.multiplier[c].offset;
    }
  }
  if (has_bias) std::memcpy(h + (per_channel - 1) * n, p.bias.data(), n * sizeof(int32_t));
  DeviceEpilogue d;
  // The caching host allocator keeps the pinned block until the copy has run.
  d.params = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  d.row_sums = row_sums.contiguous();
  const int32_t* dp = d.params.const_data_ptr<int32_t>();
  Epilogue& ep = d.ep;
  ep.row_sums = d.row_sums.const_data_ptr<int32_t>();
  ep.bias = has_bias ? dp + (per_channel - 1) * n : nullptr;
  ep.scale = p.output.is_float ? reinterpret_cast<const float*>(dp) : nullptr;
  ep.mult = p.output.is_float ? nullptr : dp;
  ep.expo = p.output.is_float ? nullptr : dp + n;
  ep.offset = p.output.is_float ? nullptr : dp + 2 * n;
  ep.a_zero_point = p.input.zero_point;
  ep.out_zero_point = p.output.zero_point;
  ep.out_min = p.output.min;
  ep.out_max = p.output.max;
  ep.relu = p.output.relu;
  return d;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The packed weight as the GEMM reads it: dense and 16-byte aligned.
at::Tensor aligned_weight(const at::Tensor& packed_weight) {
  at::Tensor w = packed_weight.contiguous();
  if (!aligned16(w.const_data_ptr())) w = w.clone();
  return w;
}

at::Tensor quantized_linear_cuda(const at::Tensor& input, const at::Tensor& packed_weight,
                                 const at::Tensor& row_sums, at::IntArrayRef weight_shape,
                                 const at::Tensor& weight_scale,
                                 const std::optional<at::Tensor>& bias,
                                 std::optional<double> output_scale, int64_t output_zero_point,
                                 int64_t output_min, int64_t output_max, bool relu) {
  // The checks and their order are those of the CPU kernel (ops/cpu/quantized_layers_kernel.cpp).
  constexpr const char* op = "qext.quantized_linear";
  const auto call =
      detail::resolve_linear_call(input, packed_weight, row_sums, weight_shape, weight_scale, bias,
                                  output_scale, output_zero_point, output_min, output_max, relu);
  const Int8LayerParams& p = call.params;
  const Int8Output& out = p.output;
  const int64_t M = call.shape.rows, N = call.shape.out_features, K = call.shape.in_features;
  auto sizes = input.sizes().vec();
  sizes.back() = N;

  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor y = detail::empty_int8_output(sizes, out, input.options());
  if (M == 0) return y;
  check_device_capability(op);
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max() && N <= std::numeric_limits<int32_t>::max(),
              op, ": ", M, " x ", N, " outputs are too many for the CUDA kernel");

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const DeviceEpilogue dep = upload_epilogue(p, row_sums, input.device());
  const at::Tensor w = aligned_weight(packed_weight);

  // A: the input itself when its rows are 16-byte aligned (int8 levels flipped in the GEMM), else
  // a copy with rows padded to 16 bytes and the levels flipped.
  const at::Tensor x = input.contiguous();
  const auto* x_ptr = static_cast<const uint8_t*>(x.const_data_ptr());
  at::Tensor a_buffer;
  const uint8_t* a_ptr = x_ptr;
  int64_t lda = K;
  bool flip_a = p.input.flip != 0;
  if (K % 16 != 0 || !aligned16(x_ptr)) {
    lda = round_up(K, 16);
    a_buffer = at::empty({M * lda}, at::TensorOptions().device(input.device()).dtype(at::kByte));
    a_ptr = a_buffer.const_data_ptr<uint8_t>();
    pad_rows_kernel<<<elementwise_blocks(M * lda / 4), kElementwiseThreads, 0, stream>>>(
        x_ptr, M, K, a_buffer.mutable_data_ptr<uint8_t>(), lda, p.input.flip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    flip_a = false;
  }

  GemmArgs args{};
  args.a = a_ptr;
  args.lda = lda;
  args.a_group = 0;
  args.a_cols = static_cast<int>(lda);
  args.w = w.const_data_ptr<int8_t>();
  args.w_group = 0;
  args.c = y.data_ptr();
  args.ldc = N;
  args.c_group = 0;
  args.M = static_cast<int>(M);
  args.N = static_cast<int>(N);
  args.k_tiles = static_cast<int>(kernels::packed_k(K) / kTileK);
  args.ep = dep.ep;
  launch_gemm(args, 1, flip_a, out.is_float, stream);
  return y;
}

at::Tensor quantized_conv2d_cuda(const at::Tensor& input, const at::Tensor& packed_weight,
                                 const at::Tensor& row_sums, at::IntArrayRef weight_shape,
                                 const at::Tensor& weight_scale,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                 std::optional<double> output_scale, int64_t output_zero_point,
                                 int64_t output_min, int64_t output_max, bool relu) {
  // The checks and their order are those of the CPU kernel.
  constexpr const char* op = "qext.quantized_conv2d";
  const auto call = detail::resolve_conv2d_call(
      input, packed_weight, row_sums, weight_shape, weight_scale, bias, stride, padding, dilation,
      groups, output_scale, output_zero_point, output_min, output_max, relu);
  const Int8LayerParams& p = call.params;
  const Int8Output& out = p.output;
  const auto& geometry = call.shape.geometry;
  const bool depthwise = call.shape.depthwise;
  const int64_t OC = geometry.out_channels, K = geometry.group_k(), OCg = OC / groups;
  const int64_t group_bytes = call.shape.group_bytes;
  const ConvShape g = conv_shape(geometry);

  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor y = detail::empty_int8_output({g.batch, OC, g.out_height, g.out_width}, out,
                                           input.options(), at::MemoryFormat::ChannelsLast);
  if (g.batch == 0) return y;
  check_device_capability(op);
  const int64_t rows = g.batch * g.out_height * g.out_width;  // output pixels: GEMM rows

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const DeviceEpilogue dep = upload_epilogue(p, row_sums, input.device());
  const at::Tensor w = aligned_weight(packed_weight);
  const auto* x_ptr = static_cast<const uint8_t*>(input.const_data_ptr());

  if (depthwise) {
    DepthwiseArgs d{};
    d.in = x_ptr;
    d.sn = input.stride(0);
    d.sc = input.stride(1);
    d.sh = input.stride(2);
    d.sw = input.stride(3);
    d.g = g;
    d.w = w.const_data_ptr<int8_t>();
    d.out = static_cast<uint8_t*>(y.data_ptr());
    d.flip = p.input.flip;
    d.ep = dep.ep;
    depthwise_kernel<<<elementwise_blocks(rows * g.channels), kElementwiseThreads, 0, stream>>>(d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
  }

  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), op, ": ", rows,
              " output pixels are too many for the CUDA kernel");
  const int64_t cg = g.channels / groups;
  GemmArgs args{};
  args.w = w.const_data_ptr<int8_t>();
  args.w_group = group_bytes;
  args.ldc = OC;
  args.c_group = OCg;
  args.N = static_cast<int>(OCg);
  args.k_tiles = static_cast<int>(kernels::packed_k(K) / kTileK);
  args.ep = dep.ep;
  auto* const c_base = static_cast<uint8_t*>(y.data_ptr());
  const int64_t c_elem = out.is_float ? 4 : 1;

  // 1 x 1, stride 1, unpadded, channels_last input: the input is the GEMM's A ([rows, C]; group
  // g's columns start at g * Cg).
  const bool direct = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 &&
                      cg % 16 == 0 && input.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                      aligned16(x_ptr);
  if (direct) {
    args.a = x_ptr;
    args.lda = g.channels;
    args.a_group = cg;
    args.a_cols = static_cast<int>(cg);
    args.c = c_base;
    args.M = static_cast<int>(rows);
    launch_gemm(args, static_cast<int>(groups), p.input.flip != 0, out.is_float, stream);
    return y;
  }

  // im2col in chunks of rows (bounded scratch), each followed by the GEMM of its rows.
  const int64_t kg16 = round_up(K, 16);
  const int64_t row_bytes = groups * kg16;
  const int64_t chunk_rows =
      std::min(rows, std::max<int64_t>(128, kIm2colBudget / row_bytes / 128 * 128));
  at::Tensor buffer = at::empty({chunk_rows * row_bytes},
                                at::TensorOptions().device(input.device()).dtype(at::kByte));
  Im2colArgs im{};
  im.in = x_ptr;
  im.sn = input.stride(0);
  im.sc = input.stride(1);
  im.sh = input.stride(2);
  im.sw = input.stride(3);
  im.g = g;
  im.out = buffer.mutable_data_ptr<uint8_t>();
  im.kg16 = kg16;
  im.flip = p.input.flip;
  im.pad = static_cast<uint8_t>(p.input.zero_point);
  args.a = buffer.const_data_ptr<uint8_t>();
  args.lda = row_bytes;
  args.a_group = kg16;
  args.a_cols = static_cast<int>(kg16);
  for (int64_t row0 = 0; row0 < rows; row0 += chunk_rows) {
    const int64_t n_rows = std::min(chunk_rows, rows - row0);
    im.row0 = row0;
    im.rows = n_rows;
    im2col_kernel<<<elementwise_blocks(n_rows * row_bytes / 4), kElementwiseThreads, 0, stream>>>(
        im);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    args.c = c_base + row0 * OC * c_elem;
    args.M = static_cast<int>(n_rows);
    launch_gemm(args, static_cast<int>(groups), /*flip_a=*/false, out.is_float, stream);
  }
  return y;
}

}  // namespace

// The layer ops dispatch on their quantized input (QuantizedCUDA); registered at CUDA too so that a
// float CUDA tensor given by mistake gets the op's own message (as on the CPU).
TORCH_LIBRARY_IMPL(qext, QuantizedCUDA, m) {
  m.impl("quantized_linear", quantized_linear_cuda);
  m.impl("quantized_conv2d", quantized_conv2d_cuda);
}

TORCH_LIBRARY_IMPL(qext, CUDA, m) {
  m.impl("quantized_linear", quantized_linear_cuda);
  m.impl("quantized_conv2d", quantized_conv2d_cuda);
}

}  // namespace qext::ops
