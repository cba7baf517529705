// Weight-only matrix-vector kernels over quantscope's packed storage, for the x86-64 CPU (AVX2 + FMA + F16C).
//
//   y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = (code(n, k) - zero[n, g]) * scale[n, g]   (affine)
//                                         W[n, k] = table[code(n, k)] * scale[n, g]           (lookup, NF4/FP4)
//   with g = k / G (groups of G input columns, the last one may be partial).
//
// The packed codes are read as stored (two 4-bit codes per byte, low nibble first; or one byte per
// code), widened to fp32 in registers and multiplied with the fp32 activations: activations stay fp32,
// so a result differs from dequantize + fp32 matmul only by the order of the sums. The zero point is
// taken out per group (sum (q - z) x = sum q x - z sum x), the scale applied once per group.
// Work is split over output rows with OpenMP (the runtime torch itself loaded: libgomp.so.1), in chunks
// handed out as threads come free (on a shared machine a descheduled thread then holds up less work).
// Built by quantscope/modules/cpu_kernels.py; no torch headers, called through ctypes.

#include "cpu_codes.h"

namespace {

#ifdef __AVX512F__
// The AVX-512 build's 4-bit step (xp as for rows_dot): two rows' 64 codes side by side in one 512-bit
// register, xp's 8 values broadcast to both halves, so each mask / convert / multiply-add serves two rows;
// the scaled group sums stay in 512-bit registers across groups (a group of 64 columns is one step, so
// per-group work was as large as the step's own). Columns past the last whole 64 of a group: scalar.
template <int R>
inline void rows_dot_u4_pairs(const float* x, const float* xp, const float* xg, const uint8_t* codes,
                              int64_t row_bytes, const char* scales, int sstride, int sf32, const uint16_t* zeros,
                              float zconst, int64_t ng, int64_t K, int64_t G, float* y) {
    constexpr int P = R / 2;
    __m512 tot[P];
    float scalar[R];
    for (int p = 0; p < P; ++p) tot[p] = _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) scalar[r] = 0.f;
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
        __m512 z0[P], z1[P];
        for (int p = 0; p < P; ++p) { z0[p] = _mm512_setzero_ps(); z1[p] = _mm512_setzero_ps(); }
        int64_t k = k0;
        for (; k + 64 <= k1; k += 64) {
            __m512i v[P];
            for (int p = 0; p < P; ++p)
                v[p] = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 2 * p * row_bytes + k / 2))),
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (2 * p + 1) * row_bytes + k / 2)), 1);
            for (int j = 0; j < 8; ++j) {
                const __m512 xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(xp + k + 8 * j));
                for (int p = 0; p < P; ++p) {
                    const __m512i q = j < 7 ? _mm512_and_si512(v[p], _mm512_set1_epi32(0xF << (4 * j)))
                                            : _mm512_srli_epi32(v[p], 28);
                    if (j & 1) z1[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), xv, z1[p]);
                    else z0[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), xv, z0[p]);
                }
            }
        }
        float s[R];
        for (int r = 0; r < R; ++r) {
            s[r] = scale_at(scales ? static_cast<const void*>(scales + r * ng * sstride) : nullptr, sf32, g);
            const float z = zeros ? _cvtsh_ss(zeros[r * ng + g]) : zconst;
            float tail = 0.f;
            for (int64_t j = k; j < k1; ++j) tail += code_at<U4>(codes + r * row_bytes, j, nullptr) * x[j];
            scalar[r] += s[r] * (tail - z * xg[g]);
        }
        for (int p = 0; p < P; ++p) {
            const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(s[2 * p]), _mm256_set1_ps(s[2 * p + 1]), 1);
            tot[p] = _mm512_fmadd_ps(sv, _mm512_add_ps(z0[p], z1[p]), tot[p]);
        }
    }
    for (int p = 0; p < P; ++p) {
        y[2 * p] = hsum(_mm512_castps512_ps256(tot[p])) + scalar[2 * p];
        y[2 * p + 1] = hsum(_mm512_extractf32x8_ps(tot[p], 1)) + scalar[2 * p + 1];
    }
}
#endif

// R output rows n..n+R for one activation row x (the decode step): x is loaded once for all R rows, and
// each row sums into two accumulators, so 2R independent chains of fused multiply-adds are in flight (a
// single chain per row waits on the previous add's latency at every step, about 4x below throughput)
//
// 4-bit codes (C == U4) with xp (groups a multiple of 64 wide: permute_u4) take 64 columns per step without
// a single shuffle: a 32-byte load holds codes 8i..8i+7 in dword i, nibble j being code 8i + j. Masking
// nibble j leaves code * 16^j as an exact integer, converted exactly to fp32, and xp holds x[8i + j] * 16^-j
// (exact: a power of two), so each product equals code * x before its one rounding; the widening shuffles
// the 16-column step needs are the port it is bound by.
template <int C, int R>
inline void rows_dot(const float* x, const float* xp, const float* xg, const uint8_t* codes, int64_t row_bytes,
                     const char* scales, int sstride, int sf32, const uint16_t* zeros, float zconst, int64_t ng,
                     int64_t K, int64_t G, const float* table, __m256 tlo, __m256 thi, float* y) {
#ifdef __AVX512F__
    if (C == U4 && R % 2 == 0 && xp != nullptr) {
        rows_dot_u4_pairs<(R % 2 == 0 ? R : 2)>(x, xp, xg, codes, row_bytes, scales, sstride, sf32, zeros, zconst, ng, K, G, y);
        return;
    }
#endif
    __m256 total[R];
    float scalar[R];
    for (int r = 0; r < R; ++r) { total[r] = _mm256_setzero_ps(); scalar[r] = 0.f; }
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
        __m256 acc0[R], acc1[R];
        for (int r = 0; r < R; ++r) { acc0[r] = _mm256_setzero_ps(); acc1[r] = _mm256_setzero_ps(); }
        int64_t k = k0;
#ifdef __AVX512F__
        // and 8-bit codes sixteen at a time: one widening from memory per 16 codes, half the AVX2 step's;
        // table codes (NF4/FP4) too: one 16-entry permute looks up all 16 values (AVX2: two and a blend)
        if (C == S8 || C == U8 || C == LUT4) {
            __m512 zs[R];
            for (int r = 0; r < R; ++r) zs[r] = _mm512_setzero_ps();
            const __m512 tz = _mm512_insertf32x8(_mm512_castps256_ps512(tlo), thi, 1);
            const __m128i m4 = _mm_set1_epi8(0x0F);
            for (; k + 16 <= k1; k += 16) {
                const __m512 xv = _mm512_loadu_ps(x + k);
                for (int r = 0; r < R; ++r) {
                    __m512 w;
                    if (C == LUT4) {
                        const __m128i by = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + r * row_bytes + k / 2));
                        const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(by, m4), _mm_and_si128(_mm_srli_epi16(by, 4), m4));
                        w = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c), tz);
                    } else {
                        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + r * row_bytes + k));
                        w = _mm512_cvtepi32_ps(C == S8 ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
                    }
                    zs[r] = _mm512_fmadd_ps(w, xv, zs[r]);
                }
            }
            for (int r = 0; r < R; ++r) {
                acc0[r] = _mm256_add_ps(acc0[r], _mm512_castps512_ps256(zs[r]));
                acc1[r] = _mm256_add_ps(acc1[r], _mm512_extractf32x8_ps(zs[r], 1));
            }
        }
#endif
        if (C == U4 && xp != nullptr) {
            for (; k + 64 <= k1; k += 64) {
                __m256i v[R];
                for (int r = 0; r < R; ++r)
                    v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + r * row_bytes + k / 2));
                for (int j = 0; j < 8; ++j) {
                    const __m256 xv = _mm256_loadu_ps(xp + k + 8 * j);
                    for (int r = 0; r < R; ++r) {
                        const __m256i q = j < 7 ? _mm256_and_si256(v[r], _mm256_set1_epi32(0xF << (4 * j)))
                                                : _mm256_srli_epi32(v[r], 28);
                        if (j & 1) acc1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), xv, acc1[r]);
                        else acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), xv, acc0[r]);
                    }
                }
            }
        }
        for (; k + 16 <= k1; k += 16) {
            const __m256 xa = _mm256_loadu_ps(x + k), xb = _mm256_loadu_ps(x + k + 8);
            for (int r = 0; r < R; ++r) {
                __m256 a, b;
                load16<C>(codes + r * row_bytes, k, tlo, thi, a, b);
                acc0[r] = _mm256_fmadd_ps(a, xa, acc0[r]);
                acc1[r] = _mm256_fmadd_ps(b, xb, acc1[r]);
            }
        }
        for (int r = 0; r < R; ++r) {
            const void* srow = scales ? static_cast<const void*>(scales + r * ng * sstride) : nullptr;
            const float s = scale_at(srow, sf32, g);
            const float z = zeros ? _cvtsh_ss(zeros[r * ng + g]) : zconst;
            float tail = 0.f;
            for (int64_t j = k; j < k1; ++j) tail += code_at<C>(codes + r * row_bytes, j, table) * x[j];
            total[r] = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_add_ps(acc0[r], acc1[r]), total[r]);
            scalar[r] += s * (tail - z * xg[g]);
        }
    }
    for (int r = 0; r < R; ++r) y[r] = hsum(total[r]) + scalar[r];
}

// xp for the 64-column 4-bit step: within each whole block of 64 columns, xp[8j + i] = x[8i + j] * 16^-j
// (j < 7) and x[8i + 7] (j = 7, whose nibble is shifted down instead of masked); columns past the last
// whole block are left as they are (the 16-column step reads x there)
inline void permute_u4(const float* x, float* xp, int64_t K) {
    for (int64_t b = 0; b + 64 <= K; b += 64)
        for (int j = 0; j < 8; ++j) {
            const float sc = j < 7 ? 1.f / static_cast<float>(1 << (4 * j)) : 1.f;
            for (int i = 0; i < 8; ++i) xp[b + 8 * j + i] = x[b + 8 * i + j] * sc;
        }
}

template <int C>
void matvec(const float* x, const uint8_t* codes, const void* scales, int sf32, const void* zeros,
            float zconst, const float* table, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
            int64_t row_bytes, int threads) {
    const int64_t ng = (K + G - 1) / G;
    float xg_stack[2048];
    float* xg = ng * M <= 2048 ? xg_stack : new float[ng * M];
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < ng; ++g) {
            float s = 0.f;
            const int64_t k1 = (g + 1) * G < K ? (g + 1) * G : K;
            for (int64_t k = g * G; k < k1; ++k) s += x[m * K + k];
            xg[m * ng + g] = s;
        }
    __m256 tlo = _mm256_setzero_ps(), thi = _mm256_setzero_ps();
    if (table) {
        tlo = _mm256_loadu_ps(table);
        thi = _mm256_loadu_ps(table + 8);
    }
    const int sstride = sf32 ? 4 : 2;
    constexpr int R = 4;  // output rows per step of the one-activation-row path
    constexpr int PF = 8;  // prefetch distance in blocks (measured: 1, 2, 4, 8; 8 best)
    float* xp = nullptr;  // the 4-bit step's permuted activations
    if (C == U4 && G % 64 == 0 && K >= 64) {
        xp = new float[M * K];
        for (int64_t m = 0; m < M; ++m) permute_u4(x + m * K, xp + m * K, K);
    }
    const int64_t nb = (N + R - 1) / R;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4) if (threads > 1)
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t n = b * R;
        const char* srow = scales ? static_cast<const char*>(scales) + n * ng * sstride : nullptr;
        const uint16_t* zrow = zeros ? static_cast<const uint16_t*>(zeros) + n * ng : nullptr;
        float out[R];
        // the weights come from memory on a decode step (the model does not fit in the caches): ask for
        // the block PF blocks ahead now, so its loads overlap this block's arithmetic
        if (n + (PF + 1) * R <= N) {
            const uint8_t* ahead = codes + (n + PF * R) * row_bytes;
            for (int64_t off = 0; off < R * row_bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
        }
        for (int64_t m = 0; m < M; ++m) {
            if (n + R <= N) {
                rows_dot<C, R>(x + m * K, xp ? xp + m * K : nullptr, xg + m * ng, codes + n * row_bytes, row_bytes, srow, sstride, sf32,
                               zrow, zconst, ng, K, G, table, tlo, thi, out);
                for (int r = 0; r < R; ++r) y[m * N + n + r] = out[r];
            } else {
                for (int64_t r = 0; n + r < N; ++r)
                    rows_dot<C, 1>(x + m * K, xp ? xp + m * K : nullptr, xg + m * ng, codes + (n + r) * row_bytes, row_bytes,
                                   srow ? srow + r * ng * sstride : nullptr, sstride, sf32,
                                   zrow ? zrow + r * ng : nullptr, zconst, ng, K, G, table, tlo, thi,
                                   y + m * N + n + r);
            }
        }
    }
    delete[] xp;
    if (xg != xg_stack) delete[] xg;
}

// W[n, k] in fp32, computed exactly as the reference dequantizers do, so a layer's matmul on it gives
// the reference's figures
template <int C>
void dequant(const uint8_t* codes, const void* scales, int sf32, const void* zeros, float zconst,
             const float* table, float* w, int64_t N, int64_t K, int64_t G, int64_t row_bytes, int threads) {
    const int64_t ng = (K + G - 1) / G;
    const int sstride = sf32 ? 4 : 2;
    __m256 tlo = _mm256_setzero_ps(), thi = _mm256_setzero_ps();
    if (table) {
        tlo = _mm256_loadu_ps(table);
        thi = _mm256_loadu_ps(table + 8);
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 16) if (threads > 1)
    for (int64_t n = 0; n < N; ++n) {
        const void* srow = scales ? static_cast<const void*>(static_cast<const char*>(scales) + n * ng * sstride) : nullptr;
        const uint16_t* zrow = zeros ? static_cast<const uint16_t*>(zeros) + n * ng : nullptr;
        dequant_row<C>(codes + n * row_bytes, srow, sf32, zrow, zconst, table, tlo, thi, w + n * K, K, G);
    }
}

}  // namespace

extern "C" {

// W [N, K] in fp32, bit-identical to the format's own dequantizer. 0, or -1 for an unknown kind.
int qs_dequant(const QsLayer* L, float* w, int threads) {
    QS_DISPATCH(dequant, L, L->codes, L->scales, L->sf32, L->zeros, L->zconst, L->table, w, L->N, L->K, L->G,
                L->row_bytes, threads);
}

// y [M, N] = x [M, K] times the layer's weight transposed (QsLayer: cpu_codes.h). 0, or -1 for an unknown kind.
int qs_matvec(const QsLayer* L, const float* x, float* y, int64_t M, int threads) {
    QS_DISPATCH(matvec, L, x, L->codes, L->scales, L->sf32, L->zeros, L->zconst, L->table, y, M, L->N, L->K, L->G,
                L->row_bytes, threads);
}

int qs_abi_version(void) { return 5; }
}
