/* Linear layers over GGUF block-quantised weights, with float32 activations and float32 accumulation.
 *
 * A GGUF weight row [k] is stored as blocks (32 values, or 256 for the K-quants) of small integers with float16
 * scales. Decoding a token reads every weight once, so at small batches these layers run at the speed of the weight
 * bytes; reading the blocks instead of their float32 expansion reads 3.6-7x fewer bytes.
 *
 * Each weight value is dequantised exactly as llama.cpp's reference dequantiser (and gguf-py's) computes it: the
 * same float32 operations in the same order (no fused multiply-add; -std=c11 turns off GCC's implicit contraction),
 * so a dequantised row equals gguf-py's bit for bit. The product then sums k float32 products on 16 lanes
 * (lane l takes indices l, l + 16, ...) and 4 accumulators with fused multiply-adds, and adds them in a fixed order:
 * a row's result depends on the weight's width alone, never on the other rows, and equals the float32 dequantised
 * layer up to the order of float32 sums. The AVX-512 and portable paths compute the same operations in the same
 * order. (On the 2-core AMX Xeon of the benchmarks these kernels are bound by vector throughput, not memory: a zmm
 * FMA loop runs at 1.5-1.7 G instructions/s per core there, benchmarks/vector_throughput.py, and dequantising costs
 * about one instruction per value.)
 *
 * Q8_0 has its own kernel (q8_0_linear): a block's 32 integers are multiplied by x before the block's scale
 * (acc += d * (q . x) per lane), 1.3x faster at one row than dequantising first.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define LANES 16
#define QK 32   /* values per block of the simple formats */
#define QK_K 256 /* values per super-block of the K-quants */

/* GGML's type ids (ggml.h), which gguf-py's GGMLQuantizationType mirrors. */
enum { F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

/* IEEE half -> float, exact for every input (normals, subnormals, infinities, NaN): one instruction with F16C. */
static inline float half_to_float(const uint8_t *p) {
    const uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: mantissa * 2^-24, exact in float32 */
        float value = (float)mantissa * 5.9604644775390625e-08f;
        memcpy(&bits, &value, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* The 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block (llama.cpp's get_scale_min_k4). */
static inline void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* ---- one row of each format -> k float32 values (llama.cpp's dequantize_row_*, value for value) ---------------- */

#ifdef __AVX512F__
/* AVX-512 decoders of the formats GGUF files use most: the same values as the scalar ones below, 16 at a time (the
 * scalar loops do not vectorise: the bit fields defeat GCC, and they were 3-10x slower than reading float32). */

/* 16 unsigned bytes -> 16 int32 lanes. */
static inline __m512i bytes16(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }

/* float(q) * d, per lane: the product each format's reference computes. */
static inline void store_scaled(float *y, __m512i q, float d) {
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(d)));
}

/* d * float(q) - m, per lane: the K-quants' affine step, two roundings as in the reference. */
static inline void store_affine(float *y, __m512i q, float d, float m) {
    _mm512_storeu_ps(y, _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(q)), _mm512_set1_ps(m)));
}

/* One Q4_0 / Q5_0 block -> its 32 values in two registers, w = float(q) * d as the reference computes them. */
static inline void block_q4_0(const uint8_t *b, __m512 w[2]) {
    const __m512i low = _mm512_set1_epi32(0xF), eight = _mm512_set1_epi32(8);
    const __m512 d = _mm512_set1_ps(half_to_float(b));
    const __m512i q = bytes16(b + 2);
    w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(q, low), eight)), d);
    w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(q, 4), eight)), d);
}

static inline void block_q5_0(const uint8_t *b, __m512 w[2]) {
    const __m512i low = _mm512_set1_epi32(0xF), sixteen = _mm512_set1_epi32(16);
    const __m512 d = _mm512_set1_ps(half_to_float(b));
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const __m512i q = bytes16(b + 6);
    /* value v's fifth bit is bit v of qh: a lane mask, OR-ing 16 into the lanes it selects */
    const __m512i lo = _mm512_and_si512(q, low), hi = _mm512_srli_epi32(q, 4);
    const __m512i x0 = _mm512_mask_or_epi32(lo, (__mmask16)qh, lo, sixteen);
    const __m512i x1 = _mm512_mask_or_epi32(hi, (__mmask16)(qh >> 16), hi, sixteen);
    w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(x0, sixteen)), d);
    w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(x1, sixteen)), d);
}

/* A row of 32-value blocks, each dequantised in registers by block_FMT, stored. */
#define ROW_OF_BLOCKS(FMT, BYTES)                                                                            \
    static void row_##FMT##_avx512(const uint8_t *b, int64_t k, float *y) {                                  \
        for (int64_t i = 0; i < k / QK; i++, b += BYTES, y += QK) {                                         \
            __m512 w[2];                                                                                    \
            block_##FMT(b, w);                                                                              \
            _mm512_storeu_ps(y, w[0]);                                                                      \
            _mm512_storeu_ps(y + 16, w[1]);                                                                 \
        }                                                                                                   \
    }

ROW_OF_BLOCKS(q4_0, 18)
ROW_OF_BLOCKS(q5_0, 22)

static void row_q8_0_avx512(const uint8_t *b, int64_t k, float *y) {
    for (int64_t i = 0; i < k / QK; i++, b += 34, y += QK) {
        const float d = half_to_float(b);
        store_scaled(y, _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2))), d);
        store_scaled(y + 16, _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18))), d);
    }
}

/* One 64-value chunk of a Q4_K/Q5_K super-block: nibbles of q[0..31] (low, then high), each plus its fifth bit from
 * qh (bits lo and hi; none for Q4_K). */
static inline void k_chunk_avx512(const uint8_t *q, const uint8_t *qh, int lo, int hi, float d1, float m1, float d2,
                                  float m2, float *y) {
    const __m512i low = _mm512_set1_epi32(0xF), one = _mm512_set1_epi32(1);
    for (int half = 0; half < 2; half++) {
        const __m512i v = bytes16(q + 16 * half);
        __m512i a = _mm512_and_si512(v, low), c = _mm512_srli_epi32(v, 4);
        if (qh) {
            const __m512i h = bytes16(qh + 16 * half);
            a = _mm512_or_si512(a, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, lo), one), 4));
            c = _mm512_or_si512(c, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, hi), one), 4));
        }
        store_affine(y + 16 * half, a, d1, m1);
        store_affine(y + 32 + 16 * half, c, d2, m2);
    }
}

static void row_k4_k5_avx512(const uint8_t *b, int64_t k, float *y, int fifth_bits) {
    const int64_t block_bytes = fifth_bits ? 176 : 144;
    for (int64_t i = 0; i < k / QK_K; i++, b += block_bytes) {
        const float d = half_to_float(b), dmin = half_to_float(b + 2);
        const uint8_t *scales = b + 4, *qh = fifth_bits ? b + 16 : 0, *q = b + (fifth_bits ? 48 : 16);
        for (int j = 0; j < QK_K / 64; j++, q += 32, y += 64) {
            int sc, m;
            scale_min_k4(2 * j, scales, &sc, &m);
            const float d1 = d * (float)sc, m1 = dmin * (float)m;
            scale_min_k4(2 * j + 1, scales, &sc, &m);
            k_chunk_avx512(q, qh, 2 * j, 2 * j + 1, d1, m1, d * (float)sc, dmin * (float)m, y);
        }
    }
}

static void row_q4_k_avx512(const uint8_t *b, int64_t k, float *y) { row_k4_k5_avx512(b, k, y, 0); }
static void row_q5_k_avx512(const uint8_t *b, int64_t k, float *y) { row_k4_k5_avx512(b, k, y, 1); }

static void row_q6_k_avx512(const uint8_t *b, int64_t k, float *y) {
    const __m512i low = _mm512_set1_epi32(0xF), three = _mm512_set1_epi32(3), bias = _mm512_set1_epi32(32);
    for (int64_t i = 0; i < k / QK_K; i++, b += 210) {
        const float d = half_to_float(b + 208);
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int n = 0; n < QK_K / 128; n++, ql += 64, qh += 32, sc += 8, y += 128) {
            for (int is = 0; is < 2; is++) { /* values l = 16 * is .. 16 * is + 15 of each quarter */
                const int l = 16 * is;
                const __m512i a = bytes16(ql + l), c = bytes16(ql + l + 32), h = bytes16(qh + l);
                const __m512i q1 = _mm512_or_si512(_mm512_and_si512(a, low), _mm512_slli_epi32(_mm512_and_si512(h, three), 4));
                const __m512i q2 = _mm512_or_si512(_mm512_and_si512(c, low),
                                                   _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 2), three), 4));
                const __m512i q3 = _mm512_or_si512(_mm512_srli_epi32(a, 4),
                                                   _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 4), three), 4));
                const __m512i q4 = _mm512_or_si512(_mm512_srli_epi32(c, 4),
                                                   _mm512_slli_epi32(_mm512_srli_epi32(h, 6), 4));
                store_scaled(y + l, _mm512_sub_epi32(q1, bias), d * (float)sc[is]);
                store_scaled(y + l + 32, _mm512_sub_epi32(q2, bias), d * (float)sc[is + 2]);
                store_scaled(y + l + 64, _mm512_sub_epi32(q3, bias), d * (float)sc[is + 4]);
                store_scaled(y + l + 96, _mm512_sub_epi32(q4, bias), d * (float)sc[is + 6]);
            }
        }
    }
}
#endif

static void row_q4_0(const uint8_t *b, int64_t k, float *y) {
    for (int64_t i = 0; i < k / QK; i++, b += 18, y += QK) {
        const float d = half_to_float(b);
        const uint8_t *qs = b + 2;
        for (int j = 0; j < QK / 2; j++) {
            y[j] = (float)((qs[j] & 0x0F) - 8) * d;
            y[j + QK / 2] = (float)((qs[j] >> 4) - 8) * d;
        }
    }
}

static void row_q4_1(const uint8_t *b, int64_t k, float *y) {
    for (int64_t i = 0; i < k / QK; i++, b += 20, y += QK) {
        const float d = half_to_float(b), m = half_to_float(b + 2);
        const uint8_t *qs = b + 4;
        for (int j = 0; j < QK / 2; j++) {
            y[j] = (float)(qs[j] & 0x0F) * d + m;
            y[j + QK / 2] = (float)(qs[j] >> 4) * d + m;
        }
    }
}

static void row_q5_0(const uint8_t *b, int64_t k, float *y) {
    for (int64_t i = 0; i < k / QK; i++, b += 22, y += QK) {
        const float d = half_to_float(b);
        uint32_t qh;
        memcpy(&qh, b + 2, 4);
        const uint8_t *qs = b + 6;
        for (int j = 0; j < QK / 2; j++) {
            const int x0 = ((qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10)) - 16;
            const int x1 = ((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16;
            y[j] = (float)x0 * d;
            y[j + QK / 2] = (float)x1 * d;
        }
    }
}

static void row_q5_1(const uint8_t *b, int64_t k, float *y) {
    for (int64_t i = 0; i < k / QK; i++, b += 24, y += QK) {
        const float d = half_to_float(b), m = half_to_float(b + 2);
        uint32_t qh;
        memcpy(&qh, b + 4, 4);
        const uint8_t *qs = b + 8;
        for (int j = 0; j < QK / 2; j++) {
            const int x0 = (qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10);
            const int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
            y[j] = (float)x0 * d + m;
            y[j + QK / 2] = (float)x1 * d + m;
        }
    }
}

static void row_q8_0(const uint8_t *b, int64_t k, float *y) {
    for (int64_t i = 0; i < k / QK; i++, b += 34, y += QK) {
        const float d = half_to_float(b);
        const int8_t *qs = (const int8_t *)(b + 2);
        for (int j = 0; j < QK; j++) y[j] = (float)qs[j] * d;
    }
}

/* Q4_K (fifth_bits 0) and Q5_K: per 64 values, two sub-blocks with 6-bit scales and mins; Q5_K adds a fifth bit
 * from qh (bits 2j and 2j + 1 for the pair j). */
static void row_k4_k5(const uint8_t *b, int64_t k, float *y, int fifth_bits) {
    const int64_t block_bytes = fifth_bits ? 176 : 144;
    for (int64_t i = 0; i < k / QK_K; i++, b += block_bytes) {
        const float d = half_to_float(b), dmin = half_to_float(b + 2);
        const uint8_t *scales = b + 4, *qh = b + 16, *q = b + (fifth_bits ? 48 : 16);
        for (int j = 0; j < QK_K / 64; j++, q += 32, y += 64) {
            int sc, m;
            scale_min_k4(2 * j, scales, &sc, &m);
            const float d1 = d * (float)sc, m1 = dmin * (float)m;
            scale_min_k4(2 * j + 1, scales, &sc, &m);
            const float d2 = d * (float)sc, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++) {
                const int h1 = fifth_bits ? ((qh[l] >> (2 * j)) & 1) << 4 : 0;
                const int h2 = fifth_bits ? ((qh[l] >> (2 * j + 1)) & 1) << 4 : 0;
                y[l] = d1 * (float)((q[l] & 0xF) | h1) - m1;
                y[l + 32] = d2 * (float)((q[l] >> 4) | h2) - m2;
            }
        }
    }
}

static void row_q4_k(const uint8_t *b, int64_t k, float *y) { row_k4_k5(b, k, y, 0); }
static void row_q5_k(const uint8_t *b, int64_t k, float *y) { row_k4_k5(b, k, y, 1); }

static void row_q6_k(const uint8_t *b, int64_t k, float *y) {
    for (int64_t i = 0; i < k / QK_K; i++, b += 210) {
        const float d = half_to_float(b + 208);
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int n = 0; n < QK_K / 128; n++, ql += 64, qh += 32, sc += 8, y += 128) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * (float)sc[is] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
    }
}

static void row_f16(const uint8_t *b, int64_t k, float *y) {
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + LANES <= k; i += LANES)
        _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(b + 2 * i))));
#endif
    for (; i < k; i++) y[i] = half_to_float(b + 2 * i);
}

static void row_bf16(const uint8_t *b, int64_t k, float *y) {
    for (int64_t i = 0; i < k; i++) {
        const uint32_t bits = (uint32_t)(b[2 * i] | (b[2 * i + 1] << 8)) << 16;
        memcpy(y + i, &bits, 4);
    }
}

typedef void (*row_fn)(const uint8_t *, int64_t, float *);

static row_fn row_decoder(int type) {
#ifdef __AVX512F__
    switch (type) {
    case Q4_0: return row_q4_0_avx512;
    case Q5_0: return row_q5_0_avx512;
    case Q8_0: return row_q8_0_avx512;
    case Q4_K: return row_q4_k_avx512;
    case Q5_K: return row_q5_k_avx512;
    case Q6_K: return row_q6_k_avx512;
    default: break;
    }
#endif
    switch (type) {
    case F16: return row_f16;
    case BF16: return row_bf16;
    case Q4_0: return row_q4_0;
    case Q4_1: return row_q4_1;
    case Q5_0: return row_q5_0;
    case Q5_1: return row_q5_1;
    case Q8_0: return row_q8_0;
    case Q4_K: return row_q4_k;
    case Q5_K: return row_q5_k;
    case Q6_K: return row_q6_k;
    default: return 0;
    }
}

/* ---- sums ------------------------------------------------------------------------------------------------------ */

/* Lane sums -> one float, pairwise in a fixed order (the same in both paths). */
static inline float reduce_lanes(const float *v) {
    float t[8];
    for (int i = 0; i < 8; i++) t[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; i++) t[i] = t[i] + t[i + 4];
    for (int i = 0; i < 2; i++) t[i] = t[i] + t[i + 2];
    return t[0] + t[1];
}

/* out[m * n] = sum_i w[i] * x[m * k + i] for ROWS rows of x (k a multiple of 16). The 16-value chunks of a row take
 * turns on ACCS accumulators (chunk c on c % ACCS), so that one row is not a single chain of dependent fused
 * multiply-adds (4 cycles each: a latency-bound row ran at half the speed); then the accumulators are added
 * pairwise and the lanes reduced. The order depends on k alone. */
#define ACCS 4
#ifdef __AVX512F__
/* The accumulators added pairwise, then the lanes. */
static inline float combine(const __m512 acc[ACCS]) {
    float v[LANES];
    _mm512_storeu_ps(v, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    return reduce_lanes(v);
}

#define DOT_KERNEL(ROWS)                                                                                     \
    static void dot_##ROWS(const float *x, int64_t k, const float *w, float *out, int64_t n) {              \
        __m512 acc[ROWS][ACCS];                                                                             \
        for (int m = 0; m < ROWS; m++)                                                                      \
            for (int a = 0; a < ACCS; a++) acc[m][a] = _mm512_setzero_ps();                                 \
        int64_t i = 0;                                                                                      \
        for (; i + ACCS * LANES <= k; i += ACCS * LANES)                                                    \
            for (int a = 0; a < ACCS; a++) {                                                                \
                const __m512 wi = _mm512_loadu_ps(w + i + a * LANES);                                       \
                for (int m = 0; m < ROWS; m++)                                                              \
                    acc[m][a] = _mm512_fmadd_ps(wi, _mm512_loadu_ps(x + m * k + i + a * LANES), acc[m][a]); \
            }                                                                                               \
        for (int a = 0; i < k; i += LANES, a++) {                                                           \
            const __m512 wi = _mm512_loadu_ps(w + i);                                                       \
            for (int m = 0; m < ROWS; m++) acc[m][a] = _mm512_fmadd_ps(wi, _mm512_loadu_ps(x + m * k + i), acc[m][a]); \
        }                                                                                                   \
        for (int m = 0; m < ROWS; m++) out[m * n] = combine(acc[m]);                                        \
    }
#else
#define DOT_KERNEL(ROWS)                                                                                     \
    static void dot_##ROWS(const float *x, int64_t k, const float *w, float *out, int64_t n) {              \
        float acc[ROWS][ACCS][LANES] = {{{0}}};                                                             \
        int64_t i = 0;                                                                                      \
        for (; i + ACCS * LANES <= k; i += ACCS * LANES)                                                    \
            for (int a = 0; a < ACCS; a++)                                                                  \
                for (int m = 0; m < ROWS; m++)                                                              \
                    for (int l = 0; l < LANES; l++)                                                         \
                        acc[m][a][l] = fmaf(w[i + a * LANES + l], x[m * k + i + a * LANES + l], acc[m][a][l]); \
        for (int a = 0; i < k; i += LANES, a++)                                                             \
            for (int m = 0; m < ROWS; m++)                                                                  \
                for (int l = 0; l < LANES; l++) acc[m][a][l] = fmaf(w[i + l], x[m * k + i + l], acc[m][a][l]); \
        for (int m = 0; m < ROWS; m++) {                                                                    \
            float v[LANES];                                                                                 \
            for (int l = 0; l < LANES; l++) v[l] = (acc[m][0][l] + acc[m][1][l]) + (acc[m][2][l] + acc[m][3][l]); \
            out[m * n] = reduce_lanes(v);                                                                   \
        }                                                                                                   \
    }
#endif

DOT_KERNEL(1)
DOT_KERNEL(2)
DOT_KERNEL(4)

#ifdef __AVX512F__
/* Q4_0 and Q5_0 rows without the buffer: each block is dequantised in registers (block_q4_0 / block_q5_0, the
 * values the buffer would hold) and multiplied into the accumulator the buffered dot would use (values 16c..16c+15 on
 * accumulator c % ACCS: a pair of blocks fills all four), so the result is bit for bit the buffered path's, with no
 * store and reload of every weight (1.1-1.4x at one row on Gemma's shapes). */
#define FUSED_KERNEL(FMT, BYTES, ROWS)                                                                        \
    static void FMT##_dot_##ROWS(const float *x, int64_t k, const uint8_t *row, float *out, int64_t n) {     \
        __m512 acc[ROWS][ACCS];                                                                             \
        for (int m = 0; m < ROWS; m++)                                                                      \
            for (int a = 0; a < ACCS; a++) acc[m][a] = _mm512_setzero_ps();                                 \
        const int64_t blocks = k / QK;                                                                      \
        int64_t b = 0;                                                                                      \
        for (; b + 2 <= blocks; b += 2) {                                                                   \
            __m512 w[ACCS];                                                                                 \
            block_##FMT(row + b * BYTES, w);                                                                \
            block_##FMT(row + (b + 1) * BYTES, w + 2);                                                      \
            for (int m = 0; m < ROWS; m++)                                                                  \
                for (int a = 0; a < ACCS; a++)                                                              \
                    acc[m][a] = _mm512_fmadd_ps(w[a], _mm512_loadu_ps(x + m * k + b * QK + a * LANES), acc[m][a]); \
        }                                                                                                   \
        if (b < blocks) {                                                                                   \
            __m512 w[2];                                                                                    \
            block_##FMT(row + b * BYTES, w);                                                                \
            for (int m = 0; m < ROWS; m++)                                                                  \
                for (int a = 0; a < 2; a++)                                                                 \
                    acc[m][a] = _mm512_fmadd_ps(w[a], _mm512_loadu_ps(x + m * k + b * QK + a * LANES), acc[m][a]); \
        }                                                                                                   \
        for (int m = 0; m < ROWS; m++) out[m * n] = combine(acc[m]);                                        \
    }

FUSED_KERNEL(q4_0, 18, 1)
FUSED_KERNEL(q4_0, 18, 2)
FUSED_KERNEL(q4_0, 18, 4)
FUSED_KERNEL(q5_0, 22, 1)
FUSED_KERNEL(q5_0, 22, 2)
FUSED_KERNEL(q5_0, 22, 4)

typedef void (*fused_fn)(const float *, int64_t, const uint8_t *, float *, int64_t);

/* The fused kernels of `type` for 4, 2 and 1 rows; 0 where it has none. */
static int fused_kernels(int type, fused_fn fns[3]) {
    if (type == Q4_0) {
        fns[0] = q4_0_dot_4, fns[1] = q4_0_dot_2, fns[2] = q4_0_dot_1;
        return 1;
    }
    if (type == Q5_0) {
        fns[0] = q5_0_dot_4, fns[1] = q5_0_dot_2, fns[2] = q5_0_dot_1;
        return 1;
    }
    return 0;
}
#endif

/* ---- entry points ---------------------------------------------------------------------------------------------- */

/* 1 where `type` is a format these kernels read. */
int blocks_supported(int type) { return row_decoder(type) != 0; }

/* out [n, k] = the float32 values of a weight stored as n rows of row_bytes bytes in format `type`. */
void blocks_dequantize(int type, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k, float *out,
                       int threads) {
    const row_fn decode = row_decoder(type);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < n; j++) decode(w + j * row_bytes, k, out + j * k);
}

/* y [rows, n] = x [rows, k] @ W^T for W [n, k] stored as n rows of row_bytes bytes in format `type`. Each thread
 * dequantises one weight row at a time into a buffer that stays in L1/L2, then multiplies every row of x by it. */
void blocks_linear(int type, const float *x, int64_t rows, int64_t k, const uint8_t *w, int64_t row_bytes,
                   int64_t n, float *y, int threads) {
#ifdef __AVX512F__
    /* Up to 4 rows, decoding in registers saves the buffer's store and reload; more rows would decode every block
     * once per 4 rows, where the buffered path decodes it once (1.3x slower at 16 rows). */
    fused_fn fused[3];
    if (rows <= 4 && fused_kernels(type, fused)) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t j = 0; j < n; j++) {
            for (int64_t m = 0; m < rows;) {
                const int64_t left = rows - m, step = left >= 4 ? 4 : left >= 2 ? 2 : 1;
                fused[step == 4 ? 0 : step == 2 ? 1 : 2](x + m * k, k, w + j * row_bytes, y + m * n + j, n);
                m += step;
            }
        }
        return;
    }
#endif
    const row_fn decode = row_decoder(type);
#pragma omp parallel num_threads(threads)
    {
        float *buf = aligned_alloc(64, (size_t)((k * 4 + 63) / 64 * 64));
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++) {
            decode(w + j * row_bytes, k, buf);
            for (int64_t m = 0; m < rows;) {
                const int64_t left = rows - m;
                const float *xm = x + m * k;
                float *out = y + m * n + j;
                if (left >= 4) { dot_4(xm, k, buf, out, n); m += 4; }
                else if (left >= 2) { dot_2(xm, k, buf, out, n); m += 2; }
                else { dot_1(xm, k, buf, out, n); m += 1; }
            }
        }
        free(buf);
    }
}

/* ---- Q8_0, scale per block ------------------------------------------------------------------------------------- */

/* Per block and lane l: s = q[l] * x[l] + q[l + 16] * x[l + 16], then acc[l] += d * s. */
#ifdef __AVX512F__
#define Q8_KERNEL(ROWS)                                                                                      \
    static void q8_rows_##ROWS(const float *x, int64_t k, const int8_t *qj, const float *dj, float *out,    \
                               int64_t n) {                                                                 \
        __m512 acc[ROWS];                                                                                   \
        for (int m = 0; m < ROWS; m++) acc[m] = _mm512_setzero_ps();                                        \
        for (int64_t b = 0; b < k / QK; b++) {                                                              \
            const __m512 d = _mm512_set1_ps(dj[b]);                                                         \
            const __m128i *src = (const __m128i *)(qj + b * QK);                                            \
            const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src)));               \
            const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src + 1)));           \
            for (int m = 0; m < ROWS; m++) {                                                                \
                const float *xm = x + m * k + b * QK;                                                       \
                const __m512 s = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + LANES),                           \
                                                 _mm512_mul_ps(w0, _mm512_loadu_ps(xm)));                   \
                acc[m] = _mm512_fmadd_ps(d, s, acc[m]);                                                     \
            }                                                                                               \
        }                                                                                                   \
        for (int m = 0; m < ROWS; m++) {                                                                    \
            float v[LANES];                                                                                 \
            _mm512_storeu_ps(v, acc[m]);                                                                    \
            out[m * n] = reduce_lanes(v);                                                                   \
        }                                                                                                   \
    }
#else
#define Q8_KERNEL(ROWS)                                                                                      \
    static void q8_rows_##ROWS(const float *x, int64_t k, const int8_t *qj, const float *dj, float *out,    \
                               int64_t n) {                                                                 \
        float acc[ROWS][LANES] = {{0}};                                                                     \
        for (int64_t b = 0; b < k / QK; b++) {                                                              \
            float w[QK];                                                                                    \
            for (int i = 0; i < QK; i++) w[i] = (float)qj[b * QK + i];                                      \
            for (int m = 0; m < ROWS; m++) {                                                                \
                const float *xm = x + m * k + b * QK;                                                       \
                for (int l = 0; l < LANES; l++) {                                                           \
                    const float s = fmaf(w[LANES + l], xm[LANES + l], w[l] * xm[l]);                        \
                    acc[m][l] = fmaf(dj[b], s, acc[m][l]);                                                  \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        for (int m = 0; m < ROWS; m++) out[m * n] = reduce_lanes(acc[m]);                                   \
    }
#endif

Q8_KERNEL(1)
Q8_KERNEL(2)
Q8_KERNEL(4)
Q8_KERNEL(8)

/* y [rows, n] = x [rows, k] @ (scale * q)^T; q [n, k] int8, scale [n, k / 32] float32; k a multiple of 32. */
void q8_0_linear(const float *x, int64_t rows, int64_t k, const int8_t *q, const float *scale, int64_t n,
                 float *y, int threads) {
    const int64_t blocks = k / QK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < n; j++) {
        const int8_t *qj = q + j * k;
        const float *dj = scale + j * blocks;
        for (int64_t m = 0; m < rows;) {
            const int64_t left = rows - m;
            const float *xm = x + m * k;
            float *out = y + m * n + j;
            if (left >= 8) { q8_rows_8(xm, k, qj, dj, out, n); m += 8; }
            else if (left >= 4) { q8_rows_4(xm, k, qj, dj, out, n); m += 4; }
            else if (left >= 2) { q8_rows_2(xm, k, qj, dj, out, n); m += 2; }
            else { q8_rows_1(xm, k, qj, dj, out, n); m += 1; }
        }
    }
}
