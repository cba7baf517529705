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

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

namespace {

enum Codes { U4 = 0, U8 = 1, S8 = 2, LUT4 = 3, BF16 = 4, F16 = 5 };

inline float scale_at(const void* p, int f32, int64_t i) {
    if (!p) return 1.f;  // 16-bit float weights: no scale
    return f32 ? static_cast<const float*>(p)[i] : _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 16 codes starting at column k (k even for 4-bit codes) as two vectors of 8 fp32 values
template <int C>
inline void load16(const uint8_t* row, int64_t k, __m256 tlo, __m256 thi, __m256& a, __m256& b) {
    if (C == U4 || C == LUT4) {
        __m128i by = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2));
        const __m128i m = _mm_set1_epi8(0x0F);
        __m128i c = _mm_unpacklo_epi8(_mm_and_si128(by, m), _mm_and_si128(_mm_srli_epi16(by, 4), m));
        __m256i i0 = _mm256_cvtepu8_epi32(c);
        __m256i i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(c, 8));
        if (C == U4) {
            a = _mm256_cvtepi32_ps(i0);
            b = _mm256_cvtepi32_ps(i1);
        } else {  // table[code]: the low 3 bits pick within a half, bit 3 picks the half
            a = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, i0), _mm256_permutevar8x32_ps(thi, i0),
                                 _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28)));
            b = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, i1), _mm256_permutevar8x32_ps(thi, i1),
                                 _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28)));
        }
    } else if (C == BF16 || C == F16) {  // 16-bit floats: two bytes per weight, widened exactly
        const __m128i* p = reinterpret_cast<const __m128i*>(row + 2 * k);
        __m128i h0 = _mm_loadu_si128(p), h1 = _mm_loadu_si128(p + 1);
        if (C == F16) {
            a = _mm256_cvtph_ps(h0);
            b = _mm256_cvtph_ps(h1);
        } else {
            a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h0), 16));
            b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h1), 16));
        }
    } else {
        // two 8-byte loads, each widened straight from memory (no shift of a 16-byte register: one
        // shuffle-port operation fewer per 16 codes, the port these widenings are bound by)
        __m128i lo = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
        __m128i hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 8));
        __m256i i0 = C == U8 ? _mm256_cvtepu8_epi32(lo) : _mm256_cvtepi8_epi32(lo);
        __m256i i1 = C == U8 ? _mm256_cvtepu8_epi32(hi) : _mm256_cvtepi8_epi32(hi);
        a = _mm256_cvtepi32_ps(i0);
        b = _mm256_cvtepi32_ps(i1);
    }
}

template <int C>
inline float code_at(const uint8_t* row, int64_t k, const float* table) {
    if (C == U4) return static_cast<float>((row[k / 2] >> ((k & 1) * 4)) & 15);
    if (C == LUT4) return table[(row[k / 2] >> ((k & 1) * 4)) & 15];
    if (C == U8) return static_cast<float>(row[k]);
    if (C == BF16 || C == F16) {
        uint16_t h;
        memcpy(&h, row + 2 * k, 2);
        if (C == F16) return _cvtsh_ss(h);
        uint32_t u = static_cast<uint32_t>(h) << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return static_cast<float>(static_cast<int8_t>(row[k]));
}

// one output row n for MT activation rows x[0..MT) (row stride K; xg: each row's sum over each group, for
// the zero points): the weight codes are widened once and used for all MT rows
template <int C, int MT>
inline void row_dot(const float* x, const float* xg, const uint8_t* row, const void* scales, int sf32,
                    const void* zeros, float zconst, int64_t ng, int64_t K, int64_t G, const float* table,
                    __m256 tlo, __m256 thi, float* y, int64_t ystride) {
    __m256 total[MT];
    float scalar[MT];
    for (int i = 0; i < MT; ++i) { total[i] = _mm256_setzero_ps(); scalar[i] = 0.f; }
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
        __m256 acc[MT];
        for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16) {
            __m256 a, b;
            load16<C>(row, k, tlo, thi, a, b);
            for (int i = 0; i < MT; ++i) {
                acc[i] = _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i * K + k), acc[i]);
                acc[i] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + i * K + k + 8), acc[i]);
            }
        }
        const float s = scale_at(scales, sf32, g);
        const float z = zeros ? _cvtsh_ss(static_cast<const uint16_t*>(zeros)[g]) : zconst;
        const __m256 sv = _mm256_set1_ps(s);
        for (int i = 0; i < MT; ++i) {
            float tail = 0.f;
            for (int64_t j = k; j < k1; ++j) tail += code_at<C>(row, j, table) * x[i * K + j];
            total[i] = _mm256_fmadd_ps(sv, acc[i], total[i]);
            scalar[i] += s * (tail - z * xg[i * ng + g]);
        }
    }
    for (int i = 0; i < MT; ++i) y[i * ystride] = hsum(total[i]) + scalar[i];
}

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
    __m256 total[R];
    float scalar[R];
    for (int r = 0; r < R; ++r) { total[r] = _mm256_setzero_ps(); scalar[r] = 0.f; }
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
        __m256 acc0[R], acc1[R];
        for (int r = 0; r < R; ++r) { acc0[r] = _mm256_setzero_ps(); acc1[r] = _mm256_setzero_ps(); }
        int64_t k = k0;
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
    const int64_t m4 = M - M % 4;  // activation rows taken four at a time; the rest one at a time, R outputs each
    float* xp = nullptr;  // the 4-bit step's permuted activations, for the rows taken one at a time
    if (C == U4 && m4 < M && G % 64 == 0 && K >= 64) {
        xp = new float[(M - m4) * K];
        for (int64_t m = m4; m < M; ++m) permute_u4(x + m * K, xp + (m - m4) * K, K);
    }
    if (m4 < M) {
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
            for (int64_t m = m4; m < M; ++m) {
                if (n + R <= N) {
                    rows_dot<C, R>(x + m * K, xp ? xp + (m - m4) * K : nullptr, xg + m * ng, codes + n * row_bytes, row_bytes, srow, sstride, sf32,
                                   zrow, zconst, ng, K, G, table, tlo, thi, out);
                    for (int r = 0; r < R; ++r) y[m * N + n + r] = out[r];
                } else {
                    for (int64_t r = 0; n + r < N; ++r)
                        rows_dot<C, 1>(x + m * K, xp ? xp + (m - m4) * K : nullptr, xg + m * ng, codes + (n + r) * row_bytes, row_bytes,
                                       srow ? srow + r * ng * sstride : nullptr, sstride, sf32,
                                       zrow ? zrow + r * ng : nullptr, zconst, ng, K, G, table, tlo, thi,
                                       y + m * N + n + r);
                }
            }
        }
    }
    delete[] xp;
    if (m4 == 0) {
        if (xg != xg_stack) delete[] xg;
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 16) if (threads > 1)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* row = codes + n * row_bytes;
        const void* srow = scales ? static_cast<const void*>(static_cast<const char*>(scales) + n * ng * sstride) : nullptr;
        const void* zrow = zeros ? static_cast<const void*>(static_cast<const uint16_t*>(zeros) + n * ng) : nullptr;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)  // four activation rows share each widened weight vector (eight spill)
            row_dot<C, 4>(x + m * K, xg + m * ng, row, srow, sf32, zrow, zconst, ng, K, G, table, tlo, thi, y + m * N + n, N);
    }
    if (xg != xg_stack) delete[] xg;
}

// W[n, k] in fp32, computed exactly as the reference dequantizers do ((q - z) * s, or table[q] * s:
// one rounding each, no fused multiply-add), so a layer's matmul on it gives the reference's figures
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
        const uint8_t* row = codes + n * row_bytes;
        const void* srow = scales ? static_cast<const void*>(static_cast<const char*>(scales) + n * ng * sstride) : nullptr;
        float* out = w + n * K;
        for (int64_t g = 0; g < ng; ++g) {
            const int64_t k1 = (g + 1) * G < K ? (g + 1) * G : K;
            const float s = scale_at(srow, sf32, g);
            const float z = zeros ? _cvtsh_ss(static_cast<const uint16_t*>(zeros)[n * ng + g]) : zconst;
            const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
            int64_t k = g * G;
            for (; k + 16 <= k1; k += 16) {
                __m256 a, b;
                load16<C>(row, k, tlo, thi, a, b);
                if (C != LUT4) {
                    a = _mm256_sub_ps(a, zv);
                    b = _mm256_sub_ps(b, zv);
                }
                _mm256_storeu_ps(out + k, _mm256_mul_ps(a, sv));
                _mm256_storeu_ps(out + k + 8, _mm256_mul_ps(b, sv));
            }
            for (; k < k1; ++k) out[k] = C == LUT4 ? code_at<C>(row, k, table) * s : (code_at<C>(row, k, table) - z) * s;
        }
    }
}

}  // namespace

extern "C" {

int qs_dequant(int kind, const uint8_t* codes, const void* scales, int sf32, const void* zeros, float zconst,
               const float* table, float* w, int64_t N, int64_t K, int64_t G, int64_t row_bytes, int threads) {
    switch (kind) {
        case U4: dequant<U4>(codes, scales, sf32, zeros, zconst, table, w, N, K, G, row_bytes, threads); return 0;
        case U8: dequant<U8>(codes, scales, sf32, zeros, zconst, table, w, N, K, G, row_bytes, threads); return 0;
        case S8: dequant<S8>(codes, scales, sf32, zeros, zconst, table, w, N, K, G, row_bytes, threads); return 0;
        case LUT4: dequant<LUT4>(codes, scales, sf32, zeros, zconst, table, w, N, K, G, row_bytes, threads); return 0;
        case BF16: dequant<BF16>(codes, scales, sf32, zeros, zconst, table, w, N, K, G, row_bytes, threads); return 0;
        case F16: dequant<F16>(codes, scales, sf32, zeros, zconst, table, w, N, K, G, row_bytes, threads); return 0;
    }
    return -1;
}


// kind: 0 = 4-bit codes, 1 = uint8 codes, 2 = int8 codes, 3 = 4-bit codes through a 16-entry table,
// 4 = bfloat16 / 5 = float16 weights (scales NULL: no scale).
// scales [N, ng] fp16 (sf32 = 0) or fp32 (sf32 = 1); zeros [N, ng] fp16 or NULL (then zconst);
// table: 16 fp32 values (kind 3 only). Returns 0, or -1 for an unknown kind.
int qs_matvec(int kind, const float* x, const uint8_t* codes, const void* scales, int sf32, const void* zeros,
              float zconst, const float* table, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
              int64_t row_bytes, int threads) {
    switch (kind) {
        case U4: matvec<U4>(x, codes, scales, sf32, zeros, zconst, table, y, M, N, K, G, row_bytes, threads); return 0;
        case U8: matvec<U8>(x, codes, scales, sf32, zeros, zconst, table, y, M, N, K, G, row_bytes, threads); return 0;
        case S8: matvec<S8>(x, codes, scales, sf32, zeros, zconst, table, y, M, N, K, G, row_bytes, threads); return 0;
        case LUT4: matvec<LUT4>(x, codes, scales, sf32, zeros, zconst, table, y, M, N, K, G, row_bytes, threads); return 0;
        case BF16: matvec<BF16>(x, codes, scales, sf32, zeros, zconst, table, y, M, N, K, G, row_bytes, threads); return 0;
        case F16: matvec<F16>(x, codes, scales, sf32, zeros, zconst, table, y, M, N, K, G, row_bytes, threads); return 0;
    }
    return -1;
}

int qs_abi_version(void) { return 3; }
}
