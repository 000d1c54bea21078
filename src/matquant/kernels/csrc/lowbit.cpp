// matquant low-bit CPU kernels: int2 / int3 slices (codes unpacked in registers, activations quantized to int8
// per block, integer dot products, per-group affine constants applied to the int32 sums). The layout and the math
// are documented in matquant/kernels/lowbit.py (the one place that defines them); this file only implements them.
//
// Layout (per 64-row block `blk`, per k-quad `kq` = columns 4kq..4kq+3):
//   codes[blk][kq][64]: byte 4i + b, bits 2s..2s+1 = the 2-bit plane of row 64blk + 16s + i, column 4kq + b
//   hbits[blk][kq][4][8] (int3 only): 64-bit little-endian mask s, bit 4i + b = the low bit of that code
//   params[blk][g][2][64] fp16: A, then M = B + A(2^r - 1)/2 (the group's mid-range weight), row 64blk + j
// W[row, k] = q·A + B with q = p (int2) or 2p + h (int3).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MQ_X86 1
#else
#define MQ_X86 0
#endif

namespace {

enum Isa : int64_t { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512_VNNI = 2 };

int64_t detect_isa() {
#if MQ_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl"))
    return ISA_AVX512_VNNI;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
  return ISA_SCALAR;
}

struct Job {
  const int8_t* xq;      // [M, K]
  const float* dact;     // [M, K/bs]   activation scale per block
  const float* dsum;     // [M, K/bs]   d · Σ xq per block
  const uint8_t* codes;  // [nblk, K/4, 64]
  const uint8_t* hbits;  // [nblk, K/4, 32] or null
  const c10::Half* params;  // [nblk, G, 2, 64]
  float* y;              // [M, N]
  int64_t M, N, K, G, group, bs;
  int bits;
};

// ---------------------------------------------------------------- scalar (portable reference of the layout)
void run_scalar(const Job& j, int64_t blk0, int64_t blk1) {
  const int64_t KQ = j.K / 4, nab = j.K / j.bs;
  const float h = (float)((1 << j.bits) - 1) / 2.0f;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    for (int64_t m = 0; m < j.M; ++m) {
      float acc[64] = {0};
      for (int64_t ab = 0; ab < nab; ++ab) {
        const int64_t g = ab * j.bs / j.group;
        int32_t isum[64] = {0};
        for (int64_t kq = ab * j.bs / 4; kq < (ab + 1) * j.bs / 4; ++kq) {
          const uint8_t* c = j.codes + (blk * KQ + kq) * 64;
          const uint8_t* hb = j.hbits ? j.hbits + (blk * KQ + kq) * 32 : nullptr;
          const int8_t* x = j.xq + m * j.K + 4 * kq;
          for (int s = 0; s < 4; ++s)
            for (int i = 0; i < 16; ++i)
              for (int b = 0; b < 4; ++b) {
                int q = (c[4 * i + b] >> (2 * s)) & 3;
                if (hb) q = 2 * q + ((hb[8 * s + (4 * i + b) / 8] >> ((4 * i + b) % 8)) & 1);
                isum[16 * s + i] += q * (int32_t)x[b];
              }
        }
        const c10::Half* p = j.params + (blk * j.G + g) * 128;
        const float d = j.dact[m * nab + ab], ds = j.dsum[m * nab + ab];
        for (int r = 0; r < 64; ++r) {
          const float a = (float)p[r], mid = (float)p[64 + r];
          const float bb = mid - h * a;
          acc[r] = std::fma((float)isum[r], a * d, acc[r]);
          acc[r] = std::fma(bb, ds, acc[r]);
        }
      }
      for (int r = 0; r < 64 && 64 * blk + r < j.N; ++r) j.y[m * j.N + 64 * blk + r] = acc[r];
    }
  }
}

#if MQ_X86
// ---------------------------------------------------------------- AVX-512 VNNI
template <int T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma,f16c")))
void tile_avx512(const Job& j, int64_t blk, int64_t m0) {
  const int64_t KQ = j.K / 4, nab = j.K / j.bs;
  const __m512 hv = _mm512_set1_ps((float)((1 << j.bits) - 1) / 2.0f);
  const __m512i three = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
  __m512 acc[T][4];
  for (int t = 0; t < T; ++t)
    for (int s = 0; s < 4; ++s) acc[t][s] = _mm512_setzero_ps();
  const uint8_t* cbase = j.codes + blk * KQ * 64;
  const uint8_t* hbase = j.hbits ? j.hbits + blk * KQ * 32 : nullptr;
  for (int64_t ab = 0; ab < nab; ++ab) {
    __m512i isum[T][4];
    for (int t = 0; t < T; ++t)
      for (int s = 0; s < 4; ++s) isum[t][s] = _mm512_setzero_si512();
    const int64_t kq0 = ab * j.bs / 4, kq1 = kq0 + j.bs / 4;
    for (int64_t kq = kq0; kq < kq1; ++kq) {
      const __m512i c = _mm512_loadu_si512((const void*)(cbase + kq * 64));
      __m512i u[4];
      u[0] = _mm512_and_si512(c, three);
      u[1] = _mm512_and_si512(_mm512_srli_epi16(c, 2), three);
      u[2] = _mm512_and_si512(_mm512_srli_epi16(c, 4), three);
      u[3] = _mm512_and_si512(_mm512_srli_epi16(c, 6), three);
      if (hbase) {
        const uint64_t* hm = (const uint64_t*)(hbase + kq * 32);
        for (int s = 0; s < 4; ++s) {
          __m512i w = _mm512_add_epi8(u[s], u[s]);
          u[s] = _mm512_mask_add_epi8(w, (__mmask64)hm[s], w, one);
        }
      }
      for (int t = 0; t < T; ++t) {
        int32_t xw;
        std::memcpy(&xw, j.xq + (m0 + t) * j.K + 4 * kq, 4);
        const __m512i xv = _mm512_set1_epi32(xw);
        for (int s = 0; s < 4; ++s) isum[t][s] = _mm512_dpbusd_epi32(isum[t][s], u[s], xv);
      }
    }
    const int64_t g = ab * j.bs / j.group;
    const c10::Half* p = j.params + (blk * j.G + g) * 128;
    __m512 av[4], bv[4];
    for (int s = 0; s < 4; ++s) {
      av[s] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 16 * s)));
      const __m512 mid = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 64 + 16 * s)));
      bv[s] = _mm512_fnmadd_ps(hv, av[s], mid);
    }
    for (int t = 0; t < T; ++t) {
      const __m512 d = _mm512_set1_ps(j.dact[(m0 + t) * nab + ab]);
      const __m512 ds = _mm512_set1_ps(j.dsum[(m0 + t) * nab + ab]);
      for (int s = 0; s < 4; ++s) {
        acc[t][s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t][s]), _mm512_mul_ps(av[s], d), acc[t][s]);
        acc[t][s] = _mm512_fmadd_ps(bv[s], ds, acc[t][s]);
      }
    }
  }
  const int64_t rows = std::min<int64_t>(64, j.N - 64 * blk);
  for (int t = 0; t < T; ++t) {
    float* yr = j.y + (m0 + t) * j.N + 64 * blk;
    for (int s = 0; s < 4; ++s) {
      const int64_t left = rows - 16 * s;
      if (left >= 16) _mm512_storeu_ps(yr + 16 * s, acc[t][s]);
      else if (left > 0) _mm512_mask_storeu_ps(yr + 16 * s, (__mmask16)((1u << left) - 1), acc[t][s]);
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma,f16c")))
void run_avx512(const Job& j, int64_t blk0, int64_t blk1) {
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    int64_t m = 0;
    for (; m + 4 <= j.M; m += 4) tile_avx512<4>(j, blk, m);
    switch (j.M - m) {
      case 3: tile_avx512<3>(j, blk, m); break;
      case 2: tile_avx512<2>(j, blk, m); break;
      case 1: tile_avx512<1>(j, blk, m); break;
      default: break;
    }
  }
}

// ---------------------------------------------------------------- AVX2 (maddubs + madd)
template <int T>
__attribute__((target("avx2,fma,f16c")))
void tile_avx2(const Job& j, int64_t blk, int64_t m0) {
  const int64_t KQ = j.K / 4, nab = j.K / j.bs;
  const __m256 hv = _mm256_set1_ps((float)((1 << j.bits) - 1) / 2.0f);
  const __m256i three = _mm256_set1_epi8(3), ones16 = _mm256_set1_epi16(1);
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bitsel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  __m256 acc[T][8];  // [s*2 + half]: rows 16s + 8half .. +8
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < 8; ++v) acc[t][v] = _mm256_setzero_ps();
  const uint8_t* cbase = j.codes + blk * KQ * 64;
  const uint8_t* hbase = j.hbits ? j.hbits + blk * KQ * 32 : nullptr;
  for (int64_t ab = 0; ab < nab; ++ab) {
    __m256i isum[T][8];
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < 8; ++v) isum[t][v] = _mm256_setzero_si256();
    const int64_t kq0 = ab * j.bs / 4, kq1 = kq0 + j.bs / 4;
    for (int64_t kq = kq0; kq < kq1; ++kq) {
      __m256i u[8];
      for (int hf = 0; hf < 2; ++hf) {
        const __m256i c = _mm256_loadu_si256((const __m256i*)(cbase + kq * 64 + 32 * hf));
        u[0 + hf] = _mm256_and_si256(c, three);
        u[2 + hf] = _mm256_and_si256(_mm256_srli_epi16(c, 2), three);
        u[4 + hf] = _mm256_and_si256(_mm256_srli_epi16(c, 4), three);
        u[6 + hf] = _mm256_and_si256(_mm256_srli_epi16(c, 6), three);
      }
      if (hbase) {
        const uint32_t* hm = (const uint32_t*)(hbase + kq * 32);
        for (int v = 0; v < 8; ++v) {  // mask s = v/2, its 32-bit half v%2
          __m256i mk = _mm256_shuffle_epi8(_mm256_set1_epi32((int)hm[v]), shuf);
          mk = _mm256_cmpeq_epi8(_mm256_and_si256(mk, bitsel), bitsel);  // 0xFF = -1 where the bit is set
          u[v] = _mm256_sub_epi8(_mm256_add_epi8(u[v], u[v]), mk);
        }
      }
      for (int t = 0; t < T; ++t) {
        int32_t xw;
        std::memcpy(&xw, j.xq + (m0 + t) * j.K + 4 * kq, 4);
        const __m256i xv = _mm256_set1_epi32(xw);
        for (int v = 0; v < 8; ++v)
          isum[t][v] = _mm256_add_epi32(isum[t][v], _mm256_madd_epi16(_mm256_maddubs_epi16(u[v], xv), ones16));
      }
    }
    const int64_t g = ab * j.bs / j.group;
    const c10::Half* p = j.params + (blk * j.G + g) * 128;
    __m256 av[8], bv[8];
    for (int v = 0; v < 8; ++v) {
      av[v] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8 * v)));
      const __m256 mid = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 64 + 8 * v)));
      bv[v] = _mm256_fnmadd_ps(hv, av[v], mid);
    }
    for (int t = 0; t < T; ++t) {
      const __m256 d = _mm256_set1_ps(j.dact[(m0 + t) * nab + ab]);
      const __m256 ds = _mm256_set1_ps(j.dsum[(m0 + t) * nab + ab]);
      for (int v = 0; v < 8; ++v) {
        acc[t][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t][v]), _mm256_mul_ps(av[v], d), acc[t][v]);
        acc[t][v] = _mm256_fmadd_ps(bv[v], ds, acc[t][v]);
      }
    }
  }
  const int64_t rows = std::min<int64_t>(64, j.N - 64 * blk);
  for (int t = 0; t < T; ++t) {
    float* yr = j.y + (m0 + t) * j.N + 64 * blk;
    for (int v = 0; v < 8; ++v) {
      const int64_t left = rows - 8 * v;
      if (left >= 8) {
        _mm256_storeu_ps(yr + 8 * v, acc[t][v]);
      } else if (left > 0) {
        float tmp[8];
        _mm256_storeu_ps(tmp, acc[t][v]);
        for (int64_t r = 0; r < left; ++r) yr[8 * v + r] = tmp[r];
      }
    }
  }
}

__attribute__((target("avx2,fma,f16c")))
void run_avx2(const Job& j, int64_t blk0, int64_t blk1) {
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    int64_t m = 0;
    for (; m + 2 <= j.M; m += 2) tile_avx2<2>(j, blk, m);
    if (m < j.M) tile_avx2<1>(j, blk, m);
  }
}
#endif

// Activations: per token and block of bs, d = max|x| / 127, xq = rint(x / d) (0 where d = 0), dsum = d · Σ xq.
void quantize_activations(const float* x, int64_t M, int64_t K, int64_t bs, int8_t* xq, float* dact, float* dsum) {
  const int64_t nab = K / bs;
  at::parallel_for(0, M * nab, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t idx = b0; idx < b1; ++idx) {
      const float* xb = x + idx * bs;  // rows are contiguous: token m, block ab = idx
      int8_t* qb = xq + idx * bs;
      float amax = 0.f;
      for (int64_t k = 0; k < bs; ++k) amax = std::max(amax, std::fabs(xb[k]));
      const float d = amax / 127.0f;
      int32_t sq = 0;
      for (int64_t k = 0; k < bs; ++k) {
        float v = d > 0.f ? std::nearbyint(xb[k] / d) : 0.f;
        v = std::min(127.f, std::max(-127.f, v));
        qb[k] = (int8_t)v;
        sq += (int32_t)v;
      }
      dact[idx] = d;
      dsum[idx] = d * (float)sq;
    }
  });
}

at::Tensor lowbit_mm(const at::Tensor& x, const at::Tensor& codes, const c10::optional<at::Tensor>& hbits,
                     const at::Tensor& params, int64_t bits, int64_t group, int64_t act_block, int64_t n,
                     int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "lowbit_mm: x must be [M, K] fp32 contiguous");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 3, "lowbit_mm: codes must be uint8 [nblk, K/4, 64]");
  TORCH_CHECK(params.scalar_type() == at::kHalf && params.is_contiguous(), "lowbit_mm: params must be fp16 [nblk, G, 2, 64]");
  TORCH_CHECK(bits == 2 || bits == 3, "lowbit_mm: bits must be 2 or 3");
  const int64_t M = x.size(0), K = x.size(1), nblk = codes.size(0);
  TORCH_CHECK(codes.size(1) * 4 == K && codes.size(2) == 64 && nblk * 64 >= n && (nblk - 1) * 64 < n, "lowbit_mm: codes shape does not match x / n");
  TORCH_CHECK(act_block % 4 == 0 && K % act_block == 0 && group % act_block == 0 && K % group == 0, "lowbit_mm: bad block sizes");
  const int64_t G = K / group;
  TORCH_CHECK(params.numel() == nblk * G * 128, "lowbit_mm: params shape does not match");
  const bool has_h = hbits.has_value() && hbits->defined();
  TORCH_CHECK((bits == 3) == has_h, "lowbit_mm: int3 needs hbits, int2 none");
  if (has_h) TORCH_CHECK(hbits->scalar_type() == at::kByte && hbits->is_contiguous() && hbits->numel() == nblk * (K / 4) * 32, "lowbit_mm: bad hbits");
  const int64_t nab = K / act_block;
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  auto dact = at::empty({M, nab}, x.options());
  auto dsum = at::empty({M, nab}, x.options());
  auto y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  quantize_activations(x.data_ptr<float>(), M, K, act_block, xq.data_ptr<int8_t>(), dact.data_ptr<float>(), dsum.data_ptr<float>());
  Job j{xq.data_ptr<int8_t>(), dact.data_ptr<float>(), dsum.data_ptr<float>(), codes.data_ptr<uint8_t>(),
        has_h ? hbits->data_ptr<uint8_t>() : nullptr, params.data_ptr<c10::Half>(), y.data_ptr<float>(),
        M, n, K, G, group, act_block, (int)bits};
  const int64_t best = detect_isa();
  const int64_t use = (isa < 0 || isa > best) ? best : isa;
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
#if MQ_X86
    if (use == ISA_AVX512_VNNI) { run_avx512(j, b0, b1); return; }
    if (use == ISA_AVX2) { run_avx2(j, b0, b1); return; }
#endif
    run_scalar(j, b0, b1);
  });
  return y;
}

// torch's int4 CPU packing of one 64-row block (verified against the real packing by lowbit.planes_convertible):
// full block: column k at byte 32k + d holds row d (low nibble) and row d + 32 (high nibble);
// partial block of nb rows: column k at byte k·nb/2 + r/2 holds row r in nibble r % 2.
inline int src_nibble(const uint8_t* base, int64_t nb, int64_t k, int64_t r) {
  uint8_t byte;
  int hi;
  if (nb == 64) { byte = base[32 * k + (r & 31)]; hi = r >= 32; }
  else { byte = base[k * nb / 2 + r / 2]; hi = r & 1; }
  return hi ? byte >> 4 : byte & 15;
}

// int2/int3 codes in the low-bit layout from the hi plane of MasterPlanes (top 4 bits of the left-aligned master
// code): the nested int2 code is nibble >> 2, the int3 code nibble >> 1 (its low bit goes to hbits).
std::vector<at::Tensor> lowbit_from_planes(const at::Tensor& hi, int64_t n, int64_t k, int64_t bits) {
  TORCH_CHECK(hi.scalar_type() == at::kByte && hi.is_contiguous() && hi.numel() * 2 == n * k, "lowbit_from_planes: hi must be the packed uint8 plane of an [n, k] layer");
  TORCH_CHECK(bits == 2 || bits == 3, "lowbit_from_planes: bits must be 2 or 3");
  TORCH_CHECK(k % 4 == 0 && n % 2 == 0, "lowbit_from_planes: k must be a multiple of 4, n even");
  const int64_t nblk = (n + 63) / 64, KQ = k / 4;
  auto codes = at::empty({nblk, KQ, 64}, hi.options());
  at::Tensor hb;
  if (bits == 3) hb = at::empty({nblk, KQ, 32}, hi.options());
  const uint8_t* src = hi.data_ptr<uint8_t>();
  uint8_t* out = codes.data_ptr<uint8_t>();
  uint8_t* hout = bits == 3 ? hb.data_ptr<uint8_t>() : nullptr;
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t nb = std::min<int64_t>(64, n - 64 * blk);
    const uint8_t* base = src + blk * 32 * k;
#if MQ_X86
    if (nb == 64) {
      for (int64_t kq = 0; kq < KQ; ++kq) {
        const uint8_t* s = base + 128 * kq;  // columns 4kq..4kq+3, 32 bytes each
        __m128i X[4], Y[4];
        for (int b = 0; b < 4; ++b) {
          X[b] = _mm_loadu_si128((const __m128i*)(s + 32 * b));
          Y[b] = _mm_loadu_si128((const __m128i*)(s + 32 * b + 16));
        }
        // 4x16 -> 16x4 byte transpose: byte 4i + b = column b, index i
        auto transpose = [](__m128i* v) {
          const __m128i t0 = _mm_unpacklo_epi8(v[0], v[1]), t1 = _mm_unpackhi_epi8(v[0], v[1]);
          const __m128i t2 = _mm_unpacklo_epi8(v[2], v[3]), t3 = _mm_unpackhi_epi8(v[2], v[3]);
          v[0] = _mm_unpacklo_epi16(t0, t2); v[1] = _mm_unpackhi_epi16(t0, t2);
          v[2] = _mm_unpacklo_epi16(t1, t3); v[3] = _mm_unpackhi_epi16(t1, t3);
        };
        transpose(X);
        transpose(Y);
        const __m128i m33 = _mm_set1_epi8(0x33), mCC = _mm_set1_epi8((char)0xCC);
        uint8_t* o = out + (blk * KQ + kq) * 64;
        for (int q = 0; q < 4; ++q) {
          const __m128i v = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(X[q], 2), m33), _mm_and_si128(Y[q], mCC));
          _mm_storeu_si128((__m128i*)(o + 16 * q), v);
        }
        if (hout) {  // mask s: rows 16s + i; s = 0: X bit 1, 1: Y bit 1, 2: X bit 5, 3: Y bit 5
          uint64_t mk[4] = {0, 0, 0, 0};
          for (int q = 0; q < 4; ++q) {
            mk[0] |= (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_slli_epi16(X[q], 6)) << (16 * q);
            mk[1] |= (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_slli_epi16(Y[q], 6)) << (16 * q);
            mk[2] |= (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_slli_epi16(X[q], 2)) << (16 * q);
            mk[3] |= (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_slli_epi16(Y[q], 2)) << (16 * q);
          }
          std::memcpy(hout + (blk * KQ + kq) * 32, mk, 32);
        }
      }
      continue;
    }
#endif
    for (int64_t kq = 0; kq < KQ; ++kq) {
      uint8_t* o = out + (blk * KQ + kq) * 64;
      uint8_t* ho = hout ? hout + (blk * KQ + kq) * 32 : nullptr;
      std::memset(o, 0, 64);
      if (ho) std::memset(ho, 0, 32);
      for (int s = 0; s < 4; ++s)
        for (int i = 0; i < 16; ++i) {
          const int64_t r = 16 * s + i;
          if (r >= nb) continue;
          for (int b = 0; b < 4; ++b) {
            const int nib = src_nibble(base, nb, 4 * kq + b, r);
            o[4 * i + b] |= (uint8_t)(((nib >> 2) & 3) << (2 * s));
            if (ho && (nib & 2)) ho[8 * s + (4 * i + b) / 8] |= (uint8_t)(1u << ((4 * i + b) % 8));
          }
        }
    }
  }
  if (bits == 3) return {codes, hb};
  return {codes};
}

int64_t lowbit_isa() { return detect_isa(); }

}  // namespace

TORCH_LIBRARY(matquant_lowbit, m) {
  m.def("mm(Tensor x, Tensor codes, Tensor? hbits, Tensor params, int bits, int group, int act_block, int n, int isa) -> Tensor");
  m.def("from_planes(Tensor hi, int n, int k, int bits) -> Tensor[]");
  m.def("isa() -> int");
}

TORCH_LIBRARY_IMPL(matquant_lowbit, CPU, m) {
  m.impl("mm", &lowbit_mm);
  m.impl("from_planes", &lowbit_from_planes);
}

TORCH_LIBRARY_IMPL(matquant_lowbit, CompositeExplicitAutograd, m) {
  m.impl("isa", &lowbit_isa);
}
