// Shared by cpu_kernels.cpp and cpu_gemm.cpp: how quantscope's packed codes are read and widened to fp32
// (x86-64, AVX2 + FMA + F16C). Everything here is internal to each translation unit (anonymous namespace).

#pragma once

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

// one row of W in fp32 (out[0..K)), computed exactly as the reference dequantizers do ((q - z) * s, or
// table[q] * s: one rounding each, no fused multiply-add); srow / zrow: this row's scales and zeros
template <int C>
inline void dequant_row(const uint8_t* row, const void* srow, int sf32, const uint16_t* zrow, float zconst,
                        const float* table, __m256 tlo, __m256 thi, float* out, int64_t K, int64_t G) {
    const int64_t ng = (K + G - 1) / G;
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t k1 = (g + 1) * G < K ? (g + 1) * G : K;
        const float s = scale_at(srow, sf32, g);
        const float z = zrow ? _cvtsh_ss(zrow[g]) : zconst;
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

}  // namespace

// One layer's storage, as cpu_kernels.py's Bound fills it once (ctypes.Structure, same field order):
// kind: 0 = 4-bit codes, 1 = uint8 codes, 2 = int8 codes, 3 = 4-bit codes through a 16-entry table,
// 4 = bfloat16 / 5 = float16 weights (scales NULL: no scale); scales [N, ng] fp16 (sf32 = 0) or fp32
// (sf32 = 1); zeros [N, ng] fp16 or NULL (then zconst); table: 16 fp32 values (kind 3 only); W is
// [N, K] in groups of G columns, row_bytes bytes of codes per row. A call then passes five arguments,
// not fifteen (ctypes converts each on every call: about 1.5 us of a decode step's 210 calls each).
struct QsLayer {
    int32_t kind, sf32;
    const uint8_t* codes;
    const void* scales;
    const void* zeros;
    const float* table;
    float zconst;
    int64_t N, K, G, row_bytes;
};

// f<kind>(args...) for a layer's kind; -1 for an unknown kind
#define QS_DISPATCH(f, L, ...)                                  \
    switch ((L)->kind) {                                        \
        case U4: f<U4>(__VA_ARGS__); return 0;                  \
        case U8: f<U8>(__VA_ARGS__); return 0;                  \
        case S8: f<S8>(__VA_ARGS__); return 0;                  \
        case LUT4: f<LUT4>(__VA_ARGS__); return 0;              \
        case BF16: f<BF16>(__VA_ARGS__); return 0;              \
        case F16: f<F16>(__VA_ARGS__); return 0;                \
    }                                                           \
    return -1
