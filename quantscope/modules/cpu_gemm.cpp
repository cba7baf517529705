// Weight-only matrix-matrix product over quantscope's packed storage, for a prefill's few dozen
// activation rows:  y[m, n] = sum_k x[m, k] * W[n, k]  (W as in cpu_kernels.cpp).
//
// At 64 rows a layer is bound by arithmetic, not by reading the weights, so the codes' size buys nothing
// by itself; the reference path (dequantize the whole weight to fp32, then the fp32 matmul) pays for
// writing and re-reading the fp32 weight besides, which made every quantized prefill slower than fp32's.
// Here each thread dequantizes a tile of TILE weight rows at a time into a buffer that stays in its
// caches (the same values the reference dequantizer gives: cpu_codes.h dequant_row) and multiplies all
// activation rows with it at once, so the fp32 weight is never written to memory. The product is a
// register-blocked dot-product kernel (MB activation rows x NB weight rows of vector accumulators, reduced
// once at the end), in AVX-512 when the library is built for it (cpu_kernels.py picks the build), else
// AVX2. Only the order of the sums differs from the reference.

#include "cpu_codes.h"

#include <stdlib.h>

namespace {

#ifdef __AVX512F__
typedef __m512 vec;
constexpr int VW = 16, MB = 4, NB = 4;  // 16 accumulators + 4 weight vectors + 1 activation of 32 registers
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline __m256 half_sum(vec v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#else
typedef __m256 vec;
constexpr int VW = 8, MB = 4, NB = 2;  // 8 accumulators + 2 weight vectors + 1 activation of 16 registers
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256 half_sum(vec v) { return v; }
#endif

constexpr int64_t TILE = 16;  // weight rows dequantized at a time: 16 x K fp32 stays in L1/L2

// four horizontal sums at once: [sum a, sum b, sum c, sum d]
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// y[i, j] = x[i, :Kp] . w[j, :Kp] for i < mb, j < nb (Kp a multiple of VW; rows zero-padded past K)
template <int mb, int nb>
void block(const float* x, const float* w, int64_t Kp, float* y, int64_t ystride) {
    vec acc[mb][nb];
    for (int i = 0; i < mb; ++i)
        for (int j = 0; j < nb; ++j) acc[i][j] = vzero();
    for (int64_t k = 0; k < Kp; k += VW) {
        vec wv[nb];
        for (int j = 0; j < nb; ++j) wv[j] = vload(w + j * Kp + k);
        for (int i = 0; i < mb; ++i) {
            const vec xv = vload(x + i * Kp + k);
            for (int j = 0; j < nb; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mb; ++i) {
        if (nb == 4) {
            _mm_storeu_ps(y + i * ystride, hsum4(half_sum(acc[i][0]), half_sum(acc[i][1 % nb]),
                                                 half_sum(acc[i][2 % nb]), half_sum(acc[i][3 % nb])));
        } else {
            for (int j = 0; j < nb; ++j) y[i * ystride + j] = hsum(half_sum(acc[i][j]));
        }
    }
}

typedef void (*block_fn)(const float*, const float*, int64_t, float*, int64_t);

template <int mb>
constexpr block_fn pick(int nb) {
    return nb == 1 ? block<mb, 1> : nb == 2 ? block<mb, (NB >= 2 ? 2 : 1)>
         : nb == 3 ? block<mb, (NB >= 3 ? 3 : 1)> : block<mb, NB>;
}

inline block_fn block_for(int mb, int nb) {
    switch (mb) {
        case 1: return pick<1>(nb);
        case 2: return pick<2>(nb);
        case 3: return pick<3>(nb);
        default: return pick<MB>(nb);
    }
}

template <int C>
void gemm(const float* x, const uint8_t* codes, const void* scales, int sf32, const void* zeros, float zconst,
          const float* table, float* y, int64_t M, int64_t N, int64_t K, int64_t G, int64_t row_bytes,
          int threads) {
    const int64_t Kp = (K + VW - 1) / VW * VW, ng = (K + G - 1) / G;
    const int sstride = sf32 ? 4 : 2;
    float* xpad = nullptr;  // activations zero-padded to Kp columns, where K is not a multiple of VW
    if (Kp != K) {
        xpad = static_cast<float*>(aligned_alloc(64, M * Kp * sizeof(float)));
        for (int64_t m = 0; m < M; ++m) {
            memcpy(xpad + m * Kp, x + m * K, K * sizeof(float));
            memset(xpad + m * Kp + K, 0, (Kp - K) * sizeof(float));
        }
    }
    const float* xs = xpad ? xpad : x;
    __m256 tlo = _mm256_setzero_ps(), thi = _mm256_setzero_ps();
    if (table) {
        tlo = _mm256_loadu_ps(table);
        thi = _mm256_loadu_ps(table + 8);
    }
    const int64_t tiles = (N + TILE - 1) / TILE;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float* wb = static_cast<float*>(aligned_alloc(64, TILE * Kp * sizeof(float)));
        for (int64_t r = 0; r < TILE; ++r) memset(wb + r * Kp + K, 0, (Kp - K) * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t n0 = t * TILE, nr = N - n0 < TILE ? N - n0 : TILE;
            for (int64_t r = 0; r < nr; ++r) {
                const int64_t n = n0 + r;
                const void* srow = scales ? static_cast<const void*>(static_cast<const char*>(scales) + n * ng * sstride) : nullptr;
                const uint16_t* zrow = zeros ? static_cast<const uint16_t*>(zeros) + n * ng : nullptr;
                dequant_row<C>(codes + n * row_bytes, srow, sf32, zrow, zconst, table, tlo, thi, wb + r * Kp, K, G);
            }
            for (int64_t m = 0; m < M; m += MB) {
                const int mb = M - m < MB ? static_cast<int>(M - m) : MB;
                for (int64_t j = 0; j < nr; j += NB) {
                    const int nb = nr - j < NB ? static_cast<int>(nr - j) : NB;
                    block_for(mb, nb)(xs + m * Kp, wb + j * Kp, Kp, y + m * N + n0 + j, N);
                }
            }
        }
        free(wb);
    }
    free(xpad);
}

}  // namespace

extern "C" {

// The same product as qs_matvec (cpu_kernels.cpp), for many rows. 0, or -1 for an unknown kind.
int qs_gemm(const QsLayer* L, const float* x, float* y, int64_t M, int threads) {
    QS_DISPATCH(gemm, L, x, L->codes, L->scales, L->sf32, L->zeros, L->zconst, L->table, y, M, L->N, L->K, L->G,
                L->row_bytes, threads);
}
}
