/* Fused CPU kernels for the weight path: one pass over each weight where the torch path makes ten.
 *
 * Every function gives the bytes the torch path (slim.quant) gives, bit for bit; tests compare the two on
 * random and adversarial inputs. They rest on IEEE-754 single precision done as written: built with
 * -ffp-contract=off (no fused multiply-add where torch rounds the product first) and without -ffast-math.
 * NaN weights are not handled specially: the callers refuse them (materialize) before quantizing.
 *
 * Each function works on a range of rows [r0, r1) of row-major tensors, so callers split a tensor across
 * threads; all outputs of a row range are written by that call only.
 */
#define _POSIX_C_SOURCE 200809L /* pthread_atfork, getpid under -std=c11 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SLIM_KERNELS_ABI 7

int slim_kernels_abi(void) { return SLIM_KERNELS_ABI; }

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float bf16_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

/* float -> bfloat16, round to nearest even; NaN -> 0xFFFF: torch's vectorized CPU conversion (copy_, .to()). */
static inline uint16_t f32_bf16(float f) {
    const uint32_t u = f32_bits(f);
    const uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0xFFFFu : rounded;
}

/* float8_e4m3fn code -> float, exactly: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; the codes
 * 0x7F and 0xFF are NaN (decoded to 0x7FF00000 with the code's sign, as torch does). The 7 magnitude bits
 * shifted left by 20 are an fp32's exponent and mantissa with a bias 120 less than fp32's: adding 120 to the
 * exponent gives the value of a normal code. A subnormal code
 * (exponent 0, value m * 2^-9) is built as the normal fp32 (1 + m/8) * 2^-6 minus 2^-6, exactly; no subnormal
 * fp32 ever appears (arithmetic on those takes a slow microcode path on x86). Branch-free: loops vectorize. */
static inline float fp8_e4m3fn_f32(uint8_t code) {
    const uint32_t mag = code & 0x7Fu;
    const float normal = bits_f32((mag << 20) + (120u << 23));
    const float subnormal = bits_f32((mag << 20) | (121u << 23)) - 0x1p-6f;
    const float v = mag >= 8 ? normal : subnormal;
    const uint32_t sign = (uint32_t)(code & 0x80u) << 24;
    return bits_f32(mag == 0x7Fu ? sign | 0x7FF00000u : f32_bits(v) | sign); /* NaN: torch's bits, sign kept */
}

static inline int nonfinite(float v) { return (f32_bits(v) & 0x7F800000u) == 0x7F800000u; }

/* One block column's stretch of a row, the plain way: value(q[j]) * s rounded once in fp32, then to bf16 (out_bf16)
 * or kept in fp32 (torch: the fp32 decode times the fp32 block scale, then copy_ to the model dtype). Returns how
 * many products are NaN or infinite. */
static inline int64_t decode_plain(const uint8_t *q, float s, int64_t n, int out_bf16, uint16_t *ob, float *of) {
    int64_t bad = 0;
    for (int64_t j = 0; j < n; j++) {
        const float v = fp8_e4m3fn_f32(q[j]) * s;
        bad += nonfinite(v);
        if (out_bf16) /* loop-invariant: the compiler keeps two vectorized loops */
            ob[j] = f32_bf16(v);
        else
            of[j] = v;
    }
    return bad;
}

static int fp8_block_decode_lut(const uint8_t *q, const float *scale, int64_t cols, int64_t bm, int64_t bn,
                                int64_t scale_cols, int64_t r0, int64_t r1, uint16_t *out, int64_t *bad);

/* DeepSeek block FP8 -> bf16 (out_bf16) or fp32: out[r][c] = value(q[r][c]) * scale[r / bm][c / bn], the product
 * rounded once in fp32, then to bf16 (torch: the fp32 decode times the fp32 block scale, then copy_ to the model
 * dtype). Rows [r0, r1). Returns how many decoded values are NaN or infinite (materialize refuses those). To bf16
 * by lookup tables where compiled in (fp8_block_decode_lut), the same bytes and count. */
int64_t slim_fp8_block_decode(const uint8_t *q, const float *scale, int64_t cols, int64_t bm, int64_t bn,
                              int64_t scale_cols, int64_t r0, int64_t r1, int out_bf16, void *out) {
    int64_t bad = 0;
    if (out_bf16 && fp8_block_decode_lut(q, scale, cols, bm, bn, scale_cols, r0, r1, out, &bad)) return bad;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *qr = q + r * cols;
        const float *sr = scale + (r / bm) * scale_cols;
        for (int64_t c0 = 0; c0 < cols; c0 += bn) {
            const int64_t n = cols - c0 < bn ? cols - c0 : bn;
            bad += decode_plain(qr + c0, sr[c0 / bn], n, out_bf16, (uint16_t *)out + r * cols + c0,
                                (float *)out + r * cols + c0);
        }
    }
    return bad;
}

/* Symmetric int4 per group (slim.quant.int4 + Scheme.quantize with the minmax observer), one group at a time:
 *   s = absmax / 7.5 (IEEE division; 0 -> FLT_EPSILON), rounded to the stored scale dtype (bf16 when
 *   scale_bf16, else fp32) and read back as fp32;
 *   code = clamp(rint(w / s), -8, 7)                       (torch.div, round half to even, clamp)
 *   sums[0] += w^2, sums[1] += (code * s - w)^2            (the weight and its error, for the SQNR)
 * w: rows of `cols` values, bf16 (w_bf16) or fp32; cols % group == 0, group <= SLIM_MAX_GROUP. codes int8
 * [rows, cols]; scale_out [rows, cols / group] as bf16 (uint16) or fp32. The sums are accumulated in LANES
 * fp32 partial sums per group and across groups in double (torch: fp32 norms of row blocks, summed in double;
 * the figures agree to ~1e-6 relative, the bytes exactly). */
#define SLIM_MAX_GROUP 4096
#define LANES 16 /* hsum16 adds up exactly this many */
/* (t + 1.5 * 2^23) - 1.5 * 2^23 is t rounded to an integer, half to even, for |t| < 2^22: the sum's ulp is 1.
 * Beyond that it is still >= 2^22 - 1 in magnitude with t's sign, which the clamp to [-8, 7] maps where it maps
 * rint(t); +-inf stay +-inf. Cheaper than rintf in the vectorized loop. */
static const float ROUNDER = 12582912.0f;
typedef float vf32 __attribute__((vector_size(LANES * sizeof(float)))); /* GCC/Clang vector extension */

int64_t slim_int4_max_group(void) { return SLIM_MAX_GROUP; }

/* The sum of a vector's 16 lanes as a tree (halves added, then their halves): four dependent vector adds where
 * adding the lanes one by one took sixteen dependent scalar ones per group and sum. */
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
static inline float hsum16(vf32 v) {
    vf8 lo8, hi8;
    memcpy(&lo8, &v, sizeof lo8);
    memcpy(&hi8, (const char *)&v + sizeof lo8, sizeof hi8);
    lo8 += hi8;
    vf4 lo4, hi4;
    memcpy(&lo4, &lo8, sizeof lo4);
    memcpy(&hi4, (const char *)&lo8 + sizeof lo4, sizeof hi4);
    lo4 += hi4;
    return (lo4[0] + lo4[2]) + (lo4[1] + lo4[3]);
}

/* One group: x[0..group) fp32 -> codes, its scale, and the two sums. Simple loops over the group (in L1), each
 * of which the compiler vectorizes. Returns the bits of the group's absmax: 0x7F800000 or more exactly when the
 * group holds an infinity or a NaN. */
static inline __attribute__((always_inline)) uint32_t int4_group(const float *x, int64_t group, float *c, int8_t *codes, float *scale_f32,
                              uint16_t *scale_b16, double *signal, double *noise) {
    uint32_t amax_bits = 0; /* |x| compared as integers: monotonic for non-NaN floats, and vectorizes */
    for (int64_t j = 0; j < group; j++) {
        const uint32_t b = f32_bits(x[j]) & 0x7FFFFFFFu;
        amax_bits = b > amax_bits ? b : amax_bits;
    }
    float s = bits_f32(amax_bits) / 7.5f;
    if (s == 0.0f) s = 1.1920928955078125e-07f; /* FLT_EPSILON, as compressed-tensors */
    if (scale_b16) {
        *scale_b16 = f32_bf16(s);
        s = bf16_f32(*scale_b16);
    } else {
        *scale_f32 = s;
    }
    for (int64_t j = 0; j < group; j++) {
        const float t = x[j] / s, r = (t + ROUNDER) - ROUNDER; /* rint(t) where it matters, see ROUNDER */
        c[j] = r < -8.0f ? -8.0f : (r > 7.0f ? 7.0f : r);
    }
    for (int64_t j = 0; j < group; j++) codes[j] = (int8_t)(int32_t)c[j];
    vf32 sig = {0}, err = {0}; /* LANES partial sums in vector registers (arrays of them stay in memory) */
    const int64_t whole = group - group % LANES;
    for (int64_t j0 = 0; j0 < whole; j0 += LANES) {
        vf32 v, cv;
        memcpy(&v, x + j0, sizeof v);
        memcpy(&cv, c + j0, sizeof cv);
        const vf32 d = cv * s - v;
        sig += v * v;
        err += d * d;
    }
    float ts = hsum16(sig), te = hsum16(err);
    for (int64_t j = whole; j < group; j++) {
        const float v = x[j], d = c[j] * s - v;
        ts += v * v;
        te += d * d;
    }
    *signal += ts;
    *noise += te;
    return amax_bits;
}

void slim_int4_quantize(const void *w, int w_bf16, int64_t cols, int64_t group, int64_t r0, int64_t r1,
                        int8_t *codes, void *scale_out, int scale_bf16, double *sums) {
    float buf[SLIM_MAX_GROUP], c[SLIM_MAX_GROUP];
    double signal = 0.0, noise = 0.0;
    const int64_t groups = cols / group;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t base = r * cols + g * group, si = r * groups + g;
            const float *x;
            if (w_bf16) {
                const uint16_t *wb = (const uint16_t *)w + base;
                for (int64_t j = 0; j < group; j++) buf[j] = bf16_f32(wb[j]);
                x = buf;
            } else {
                x = (const float *)w + base;
            }
            float *sf = scale_bf16 ? NULL : (float *)scale_out + si;
            uint16_t *sb = scale_bf16 ? (uint16_t *)scale_out + si : NULL;
            if (group == 128) /* the common size as a constant: the loops unroll without remainders */
                int4_group(x, 128, c, codes + base, sf, sb, &signal, &noise);
            else
                int4_group(x, group, c, codes + base, sf, sb, &signal, &noise);
        }
    }
    sums[0] = signal;
    sums[1] = noise;
}

/* int8 codes in [-8, 7] -> `words` of compressed-tensors' int32 words: word k holds codes 8k..8k+7, code + 8 in
 * bits 4i..4i+3 (pack_to_int32(codes, 4)). A loop the compiler vectorizes. */
static inline void pack_words(const int8_t *c, int64_t words, int32_t *o) {
    for (int64_t k = 0; k < words; k++) {
        uint32_t v = 0;
        for (int i = 0; i < 8; i++) v |= (uint32_t)((uint8_t)(c[8 * k + i] + 8) & 0xF) << (4 * i);
        o[k] = (int32_t)v;
    }
}

/* One group, codes qr[g0..g0 + group) of a row whose block scales are sr, the plain way: decoded into buf (to
 * bf16 when w_bf16) one block column at a time (groups may span block columns), then int4_group; NaN or infinite
 * decoded values counted; codes packed when `packed`, and stored only where `codes` is not NULL. */
static inline void fp8_group_int4(const uint8_t *qr, const float *sr, int64_t g0, int64_t bn, int64_t group,
                                  int w_bf16, float *buf, float *c, int8_t *codes, int32_t *packed, float *sf,
                                  uint16_t *sb, double *signal, double *noise, int64_t *nonfinite_count) {
    for (int64_t c0 = g0; c0 < g0 + group;) {
        const float s = sr[c0 / bn];
        const int64_t end = (c0 / bn + 1) * bn < g0 + group ? (c0 / bn + 1) * bn : g0 + group;
        if (w_bf16) {
            for (int64_t j = c0; j < end; j++) buf[j - g0] = bf16_f32(f32_bf16(fp8_e4m3fn_f32(qr[j]) * s));
        } else {
            for (int64_t j = c0; j < end; j++) buf[j - g0] = fp8_e4m3fn_f32(qr[j]) * s;
        }
        c0 = end;
    }
    int8_t local[SLIM_MAX_GROUP]; /* the group's codes, for packing, where they are not stored */
    int8_t *cd = codes ? codes : local;
    const uint32_t amax_bits = group == 128 ? int4_group(buf, 128, c, cd, sf, sb, signal, noise)
                                            : int4_group(buf, group, c, cd, sf, sb, signal, noise);
    if (amax_bits >= 0x7F800000u) /* an inf or NaN in the group (its absmax says so): count them */
        for (int64_t j = 0; j < group; j++) *nonfinite_count += nonfinite(buf[j]);
    if (packed) pack_words(cd, group / 8, packed);
}

/* --- Lookup-table path (x86 with AVX-512 VBMI): the same bytes, no per-weight arithmetic but the sums. ---
 *
 * Within one 128x128 block every weight is bf16(value(code) * s) for one scale s, so it is a function of its FP8
 * code, and so is its int4 code once the group's scale is known. That scale is a function of the group's
 * largest magnitude code m: the decoded magnitude grows with the magnitude code (e4m3's 7 magnitude bits are
 * ordered like the values they encode, and multiplying by |s| and rounding to bf16 keep that order), so the
 * group's absmax is |decoded(m)|. Per block column a 128-entry table of decoded magnitudes (bf16 bits), and per
 * (block column, m) met there two 128-entry tables of int4 codes (for +value and -value), each computed with
 * int4_group's own arithmetic (vectorized); then a group of 32 weights is two 128-byte table lookups (vpermi2b)
 * and a blend on the sign bits. The sums w^2 and (code * s - w)^2 are formed from the looked-up bf16 weights in
 * int4_group's 16 lanes and order, so they are its sums bit for bit. Groups this does not cover take
 * fp8_group_int4: a NaN code (m = 0x7F), a non-finite decoded absmax, a non-finite block scale, a group scale
 * that rounds to 0. Used for w_bf16 (the model dtype is bf16), group % 32 == 0 and groups inside block columns
 * (bn % group == 0). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define SLIM_LUT 1
#else
#define SLIM_LUT 0
#endif

static int use_lut = SLIM_LUT;

/* Whether the lookup-table paths (FP8 -> int4, FP8 -> bf16) are compiled in; `on` (0 or 1) switches them for this
 * process (tests compare them with the plain paths; the default is on where compiled in). Returns the state after
 * the call. */
int slim_lut(int on) {
    if (on == 0 || on == 1) use_lut = on && SLIM_LUT;
    return use_lut;
}

#if SLIM_LUT
typedef struct {
    uint8_t pos[128], neg[128]; /* int4 codes of +decoded(k), -decoded(k), k the magnitude code */
    float s;                    /* the group scale as int4_group uses it (after rounding to the stored dtype) */
    float s_f32;
    uint16_t s_b16;
    int usable; /* 0 where the scale rounds to 0 (a group of tiny weights): int4_group divides by it, the plain way */
} __attribute__((aligned(64))) int4_lut;

/* The tables of the groups whose largest magnitude code has decoded magnitude bits `amax` (bf16, finite):
 * int4_group's scale and codes. w: the block column's decoded magnitudes of the magnitude codes (bf16 bits);
 * sign_s: the block scale's sign as a bf16 sign bit, which the decoded value of a positive code carries. */
static void lut_build(int4_lut *t, const uint16_t *w, uint16_t amax, uint16_t sign_s, int scale_bf16) {
    float s = bf16_f32(amax) / 7.5f;
    if (s == 0.0f) s = 1.1920928955078125e-07f;
    if (scale_bf16) {
        t->s_b16 = f32_bf16(s);
        s = bf16_f32(t->s_b16);
    } else {
        t->s_f32 = s;
    }
    t->s = s;
    t->usable = s != 0.0f;
    /* int4_group's codes of the 128 decoded values and their negatives, 16 at a time */
    const __m512 sv = _mm512_set1_ps(s), rounder = _mm512_set1_ps(ROUNDER);
    const __m512 lo = _mm512_set1_ps(-8.0f), hi = _mm512_set1_ps(7.0f);
    const __m512i sign = _mm512_set1_epi32((int)((uint32_t)sign_s << 16)), flip = _mm512_set1_epi32((int)0x80000000u);
    for (int k = 0; k < 128; k += 16) {
        const __m256i wk = _mm256_load_si256((const __m256i *)(w + k));
        const __m512i xb = _mm512_or_si512(_mm512_slli_epi32(_mm512_cvtepu16_epi32(wk), 16), sign);
        for (int neg = 0; neg < 2; neg++) { /* x, then -x: the decoded values of codes k and k | 0x80 */
            const __m512 x = _mm512_castsi512_ps(neg ? _mm512_xor_si512(xb, flip) : xb);
            const __m512 r = _mm512_sub_ps(_mm512_add_ps(_mm512_div_ps(x, sv), rounder), rounder);
            /* r < -8 ? -8 : (r > 7 ? 7 : r); r is never NaN here (x and s finite, s > 0) */
            const __m512 cl = _mm512_max_ps(_mm512_min_ps(r, hi), lo);
            _mm_store_si128((__m128i *)((neg ? t->neg : t->pos) + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(cl)));
        }
    }
}

static inline int max_magnitude(const uint8_t *q, int64_t group) {
    const __m256i low7 = _mm256_set1_epi8(0x7F);
    __m256i mx = _mm256_setzero_si256();
    for (int64_t j = 0; j < group; j += 32)
        mx = _mm256_max_epu8(mx, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(q + j)), low7));
    __m128i m = _mm_max_epu8(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
    return _mm_cvtsi128_si32(m) & 0xFF;
}

/* hsum16 in registers: the same additions in the same order (a memcpy to a vf32 kept the accumulators in memory) */
static inline float hsum_ps(__m512 v) {
    const __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); /* AVX-512F only */
    const __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(v), upper);
    const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4)); /* (l0 + l2), (l1 + l3) */
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}

/* One group by lookup: codes (where `codes` is not NULL) and packed words, the sums in int4_group's lanes and
 * order. mags: the block column's decoded magnitudes (bf16 bits, 64-byte aligned), looked up as four 32-entry
 * tables; sign_s: the block scale's sign bit as a bf16 sign (0 or 0x8000). */
static inline void lut_group(const uint8_t *q, int64_t group, const int4_lut *t, const uint16_t *mags,
                             uint16_t sign_s, int8_t *codes, int32_t *packed, double *signal, double *noise) {
    const __m512i wt[4] = {_mm512_load_si512(mags), _mm512_load_si512(mags + 32), _mm512_load_si512(mags + 64),
                           _mm512_load_si512(mags + 96)};
    const __m512i pos_lo = _mm512_load_si512(t->pos), pos_hi = _mm512_load_si512(t->pos + 64);
    const __m512i neg_lo = _mm512_load_si512(t->neg), neg_hi = _mm512_load_si512(t->neg + 64);
    const __m256i low7 = _mm256_set1_epi8(0x7F), eight = _mm256_set1_epi8(8), low4 = _mm256_set1_epi8(0x0F);
    const __m256i nibble_pairs = _mm256_set1_epi16(0x1001); /* byte weights 1 (even code), 16 (odd code) */
    const __m512i bit6 = _mm512_set1_epi16(64), sign_bit = _mm512_set1_epi16(0x80);
    const __m512i sign_of_s = _mm512_set1_epi16((short)sign_s);
    const __m512 sv = _mm512_set1_ps(t->s);
    __m512 sig = _mm512_setzero_ps(), err = _mm512_setzero_ps();
    for (int64_t j = 0; j < group; j += 32) {
        const __m256i qb = _mm256_loadu_si256((const __m256i *)(q + j));
        const __m256i mag = _mm256_and_si256(qb, low7);
        const __m512i idx8 = _mm512_zextsi256_si512(mag);
        const __m256i cp = _mm512_castsi512_si256(_mm512_permutex2var_epi8(pos_lo, idx8, pos_hi));
        const __m256i cn = _mm512_castsi512_si256(_mm512_permutex2var_epi8(neg_lo, idx8, neg_hi));
        const __m256i code = _mm256_mask_blend_epi8(_mm256_movepi8_mask(qb), cp, cn);
        if (codes) _mm256_storeu_si256((__m256i *)(codes + j), code);
        if (packed) { /* pack_words: code + 8 as nibbles, two per byte, little end first */
            const __m256i nib = _mm256_and_si256(_mm256_add_epi8(code, eight), low4);
            _mm_storeu_si128((__m128i *)((uint8_t *)packed + j / 2),
                             _mm256_cvtepi16_epi8(_mm256_maddubs_epi16(nib, nibble_pairs)));
        }
        /* the decoded weights: |value| from the tables, sign = the code's sign xor s's sign */
        const __m512i idx = _mm512_cvtepu8_epi16(mag);
        const __m512i lo = _mm512_permutex2var_epi16(wt[0], idx, wt[1]);
        const __m512i hi = _mm512_permutex2var_epi16(wt[2], idx, wt[3]);
        __m512i w = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(idx, bit6), lo, hi);
        const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(_mm512_cvtepu8_epi16(qb), sign_bit), 8);
        w = _mm512_xor_si512(w, _mm512_xor_si512(sign, sign_of_s));
        for (int h = 0; h < 2; h++) {
            const __m256i wh = h ? _mm512_extracti64x4_epi64(w, 1) : _mm512_castsi512_si256(w);
            const __m128i ch = h ? _mm256_extracti128_si256(code, 1) : _mm256_castsi256_si128(code);
            const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(wh), 16));
            const __m512 d = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ch)), sv), v);
            sig = _mm512_add_ps(sig, _mm512_mul_ps(v, v));
            err = _mm512_add_ps(err, _mm512_mul_ps(d, d));
        }
    }
    *signal += hsum_ps(sig);
    *noise += hsum_ps(err);
}

/* The decoded magnitudes of a 128-row block, for the lookup-table paths: w[b * 128 + k] = the bf16 bits of
 * |value(k) * srow[b]| for magnitude code k, rounded as the plain paths round (0x7FFF for the NaN code k = 127);
 * where first_bad is not NULL, first_bad[b] = the smallest k whose fp32 product is NaN or infinite (127 for a finite
 * scale that overflows nothing: the decoded magnitude grows with the code). */
static void block_magnitudes(const float *srow, int64_t col_blocks, uint16_t *w, uint8_t *first_bad) {
    for (int64_t b = 0; b < col_blocks; b++) {
        int first = 127;
        for (int k = 127; k >= 0; k--) {
            const float v = fp8_e4m3fn_f32((uint8_t)k) * srow[b];
            w[b * 128 + k] = (uint16_t)(f32_bf16(v) & 0x7FFFu);
            if (nonfinite(v)) first = k;
        }
        if (first_bad) first_bad[b] = (uint8_t)first;
    }
}

/* slim_fp8_block_int4 by lookup, rows [r0, r1) in order (read and written in sequence, as the hardware prefetchers
 * and the page cache's fault-around like it; a block column at a time, the rows 1 row apart, half of the time
 * waited on loads). The tables of a 128-row block: for each block column its decoded magnitudes, and the code
 * tables of the magnitudes met so far, built on first use (slot: 0, or the table's index + 1). Returns 0 where
 * the layout is not one it covers or memory is short (the caller goes the plain way). */
static int fp8_block_int4_lut(const uint8_t *q, const float *scale, int64_t cols, int64_t bm, int64_t bn,
                              int64_t scale_cols, int w_bf16, int64_t group, int64_t r0, int64_t r1, int8_t *codes,
                              int32_t *packed, void *scale_out, int scale_bf16, double *signal, double *noise,
                              int64_t *nonfinite_count) {
    if (!use_lut || !w_bf16 || group % 32 || bn % group) return 0;
    const int64_t groups = cols / group, col_blocks = (cols + bn - 1) / bn;
    int4_lut *tables = aligned_alloc(64, (size_t)col_blocks * 128 * sizeof(int4_lut));
    uint16_t *w = aligned_alloc(64, (size_t)col_blocks * 128 * sizeof(uint16_t));
    int32_t *slot = malloc((size_t)col_blocks * 128 * sizeof(int32_t));
    float *buf = malloc(2 * SLIM_MAX_GROUP * sizeof(float)); /* the plain way's buffers, for the groups it takes */
    if (!tables || !w || !slot || !buf) {
        free(tables), free(w), free(slot), free(buf);
        return 0;
    }
    for (int64_t rb = r0 - r0 % bm; rb < r1; rb += bm) {
        const int64_t ra = rb > r0 ? rb : r0, rz = rb + bm < r1 ? rb + bm : r1;
        const float *srow = scale + (rb / bm) * scale_cols;
        block_magnitudes(srow, col_blocks, w, NULL);
        memset(slot, 0, (size_t)col_blocks * 128 * sizeof(int32_t));
        int32_t built = 0;
        for (int64_t r = ra; r < rz; r++) {
            for (int64_t g0 = 0; g0 < cols; g0 += group) {
                const int64_t b = g0 / bn, si = r * groups + g0 / group;
                const float s = srow[b];
                const uint8_t *qg = q + r * cols + g0;
                float *sf = scale_bf16 ? NULL : (float *)scale_out + si;
                uint16_t *sb = scale_bf16 ? (uint16_t *)scale_out + si : NULL;
                int32_t *pg = packed ? packed + r * (cols / 8) + g0 / 8 : NULL;
                const uint16_t *wb = w + b * 128;
                const int finite_s = (f32_bits(s) & 0x7F800000u) != 0x7F800000u;
                const uint16_t sign_s = (uint16_t)((f32_bits(s) >> 16) & 0x8000u);
                const int m = finite_s ? max_magnitude(qg, group) : 0x7F;
                const int4_lut *t = NULL;
                if (m != 0x7F && wb[m] < 0x7F80u) { /* no NaN code, a finite absmax */
                    int32_t *sl = slot + b * 128 + m;
                    if (!*sl) {
                        lut_build(&tables[built], wb, wb[m], sign_s, scale_bf16);
                        *sl = ++built;
                    }
                    t = tables[*sl - 1].usable ? &tables[*sl - 1] : NULL;
                }
                int8_t *cg = codes ? codes + r * cols + g0 : NULL;
                if (!t) {
                    fp8_group_int4(q + r * cols, srow, g0, bn, group, w_bf16, buf, buf + SLIM_MAX_GROUP, cg, pg, sf,
                                   sb, signal, noise, nonfinite_count);
                    continue;
                }
                if (sb) *sb = t->s_b16; else *sf = t->s_f32;
                lut_group(qg, group, t, wb, sign_s, cg, pg, signal, noise);
            }
        }
    }
    free(tables), free(w), free(slot), free(buf);
    return 1;
}

/* slim_fp8_block_decode to bf16 by lookup, rows [r0, r1): for each 128-row block and block column, the bf16
 * magnitudes of the 128 magnitude codes times the block scale (the plain way's rounding: an IEEE product and
 * round-to-nearest-even are symmetric in sign), looked up 32 codes at a time as four 32-entry tables, the sign
 * (the code's xor the scale's) put back; the NaN codes give 0xFFFF, as f32_bf16 gives every NaN. The non-finite
 * count is that of the fp32 products: the NaN code, and for a huge scale every magnitude from the first whose
 * product overflows (the decoded magnitude grows with the code). A block whose scale is not finite, and a block
 * column's last codes short of 32, go the plain way. Returns 0 where switched off or memory is short. */
static int fp8_block_decode_lut(const uint8_t *q, const float *scale, int64_t cols, int64_t bm, int64_t bn,
                                int64_t scale_cols, int64_t r0, int64_t r1, uint16_t *out, int64_t *bad) {
    if (!use_lut) return 0;
    const int64_t col_blocks = (cols + bn - 1) / bn;
    uint16_t *w = aligned_alloc(64, (size_t)col_blocks * 128 * sizeof(uint16_t));
    uint8_t *first_bad = malloc((size_t)col_blocks);
    if (!w || !first_bad) {
        free(w), free(first_bad);
        return 0;
    }
    const __m256i low7 = _mm256_set1_epi8(0x7F), nan_code = _mm256_set1_epi8(0x7F);
    const __m512i bit6 = _mm512_set1_epi16(64), sign_bit = _mm512_set1_epi16(0x80), ones = _mm512_set1_epi16(-1);
    int64_t count = 0;
    for (int64_t rb = r0 - r0 % bm; rb < r1; rb += bm) {
        const int64_t ra = rb > r0 ? rb : r0, rz = rb + bm < r1 ? rb + bm : r1;
        const float *srow = scale + (rb / bm) * scale_cols;
        block_magnitudes(srow, col_blocks, w, first_bad); /* the NaN code's entry is replaced by 0xFFFF below */
        for (int64_t r = ra; r < rz; r++) {
            const uint8_t *qr = q + r * cols;
            uint16_t *orow = out + r * cols;
            for (int64_t b = 0; b < col_blocks; b++) {
                const int64_t c0 = b * bn, n = cols - c0 < bn ? cols - c0 : bn;
                const float s = srow[b];
                int64_t j = 0;
                if (!nonfinite(s)) {
                    const uint16_t *wb = w + b * 128;
                    const __m512i wt0 = _mm512_load_si512(wb), wt1 = _mm512_load_si512(wb + 32);
                    const __m512i wt2 = _mm512_load_si512(wb + 64), wt3 = _mm512_load_si512(wb + 96);
                    const __m512i sign_of_s = _mm512_set1_epi16((short)((f32_bits(s) >> 16) & 0x8000u));
                    const __m256i threshold = _mm256_set1_epi8((char)first_bad[b]);
                    for (; j + 32 <= n; j += 32) {
                        const __m256i qb = _mm256_loadu_si256((const __m256i *)(qr + c0 + j));
                        const __m256i mag = _mm256_and_si256(qb, low7);
                        const __m512i code = _mm512_cvtepu8_epi16(qb); /* the permutes read its low 6 bits */
                        const __m512i lo = _mm512_permutex2var_epi16(wt0, code, wt1);
                        const __m512i hi = _mm512_permutex2var_epi16(wt2, code, wt3);
                        __m512i v = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(code, bit6), lo, hi);
                        const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(code, sign_bit), 8);
                        v = _mm512_xor_si512(v, _mm512_xor_si512(sign, sign_of_s));
                        v = _mm512_mask_mov_epi16(v, _mm256_cmpeq_epi8_mask(mag, nan_code), ones);
                        _mm512_storeu_si512((void *)(orow + c0 + j), v);
                        count += __builtin_popcount(_mm256_cmpge_epu8_mask(mag, threshold));
                    }
                }
                count += decode_plain(qr + c0 + j, s, n - j, 1, orow + c0 + j, NULL);
            }
        }
    }
    free(w), free(first_bad);
    *bad += count;
    return 1;
}
#else
static int fp8_block_int4_lut(const uint8_t *q, const float *scale, int64_t cols, int64_t bm, int64_t bn,
                              int64_t scale_cols, int w_bf16, int64_t group, int64_t r0, int64_t r1, int8_t *codes,
                              int32_t *packed, void *scale_out, int scale_bf16, double *signal, double *noise,
                              int64_t *nonfinite_count) {
    (void)q, (void)scale, (void)cols, (void)bm, (void)bn, (void)scale_cols, (void)w_bf16, (void)group, (void)r0;
    (void)r1, (void)codes, (void)packed, (void)scale_out, (void)scale_bf16, (void)signal, (void)noise;
    (void)nonfinite_count;
    return 0;
}
static int fp8_block_decode_lut(const uint8_t *q, const float *scale, int64_t cols, int64_t bm, int64_t bn,
                                int64_t scale_cols, int64_t r0, int64_t r1, uint16_t *out, int64_t *bad) {
    (void)q, (void)scale, (void)cols, (void)bm, (void)bn, (void)scale_cols, (void)r0, (void)r1, (void)out, (void)bad;
    return 0;
}
#endif

/* Block FP8 straight to int4, the bf16 (or fp32) weight never stored: per group, the decode of
 * slim_fp8_block_decode (to bf16 when w_bf16) into a buffer, then slim_int4_quantize's group; the
 * bytes of the two in a row. With `packed` (group % 8 == 0), each group's codes are also packed into
 * [rows, cols / 8] int32 words as slim_pack_int4 packs them, while they are in cache; `codes` may then be NULL
 * (the int8 codes are not stored: the streamed path writes only the words). sums[2] counts decoded
 * values that are NaN or infinite (a corrupt checkpoint; the caller refuses it as materialize does). Groups may
 * span block columns. By lookup tables where compiled in and the layout allows (fp8_block_int4_lut), the same
 * bytes and sums. */
void slim_fp8_block_int4(const uint8_t *q, const float *scale, int64_t cols, int64_t bm, int64_t bn,
                         int64_t scale_cols, int w_bf16, int64_t group, int64_t r0, int64_t r1, int8_t *codes,
                         int32_t *packed, void *scale_out, int scale_bf16, double *sums) {
    float buf[SLIM_MAX_GROUP], c[SLIM_MAX_GROUP];
    double signal = 0.0, noise = 0.0;
    int64_t nonfinite_count = 0;
    const int64_t groups = cols / group;
    if (!fp8_block_int4_lut(q, scale, cols, bm, bn, scale_cols, w_bf16, group, r0, r1, codes, packed, scale_out,
                            scale_bf16, &signal, &noise, &nonfinite_count)) {
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *qr = q + r * cols;
            const float *sr = scale + (r / bm) * scale_cols;
            for (int64_t g = 0; g < groups; g++) {
                const int64_t g0 = g * group, si = r * groups + g;
                float *sf = scale_bf16 ? NULL : (float *)scale_out + si;
                uint16_t *sb = scale_bf16 ? (uint16_t *)scale_out + si : NULL;
                int32_t *pg = packed ? packed + r * (cols / 8) + g0 / 8 : NULL;
                fp8_group_int4(qr, sr, g0, bn, group, w_bf16, buf, c, codes ? codes + r * cols + g0 : NULL, pg, sf,
                               sb, &signal, &noise, &nonfinite_count);
            }
        }
    }
    sums[0] = signal;
    sums[1] = noise;
    sums[2] = (double)nonfinite_count;
}

/* --- Worker threads for slim_fp8_block_int4, started by this library: no Python thread and so no GIL between the
 * calls. The streamed weight path (slim.kernels.fp8_block_int4_submit) queues one task per weight (or per row range
 * of one, split across workers) and waits for it later; a worker takes tasks in queue order and marks each done.
 * The caller keeps a task's memory (inputs, outputs, the task itself) alive until slim_task_wait returned. Before
 * this, each weight's kernel went through a Python thread: two GIL hand-overs per weight against the main thread's
 * Python, so every small kernel also waited for the GIL twice. */
typedef struct slim_task {
    const uint8_t *q;
    const float *scale;
    int64_t cols, bm, bn, scale_cols;
    int32_t w_bf16;
    int64_t group, r0, r1;
    int8_t *codes;
    int32_t *packed;
    void *scale_out;
    int32_t scale_bf16;
    double sums[3];
    int32_t done;
    struct slim_task *next;
} slim_task;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t work, finished;
    slim_task *head, *tail;
    int workers;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, 0};
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

/* fork: the child has no workers and a lock no thread of it holds (torchrun and data loaders fork) */
static void pool_prepare(void) { pthread_mutex_lock(&pool.lock); }
static void pool_parent(void) { pthread_mutex_unlock(&pool.lock); }
static void pool_child(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.finished, NULL);
    pool.head = pool.tail = NULL;
    pool.workers = 0;
}
static void pool_init(void) { pthread_atfork(pool_prepare, pool_parent, pool_child); }

static void *pool_worker(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&pool.lock);
        while (!pool.head) pthread_cond_wait(&pool.work, &pool.lock);
        slim_task *t = pool.head;
        pool.head = t->next;
        if (!pool.head) pool.tail = NULL;
        pthread_mutex_unlock(&pool.lock);
        slim_fp8_block_int4(t->q, t->scale, t->cols, t->bm, t->bn, t->scale_cols, t->w_bf16, t->group, t->r0, t->r1,
                            t->codes, t->packed, t->scale_out, t->scale_bf16, t->sums);
        pthread_mutex_lock(&pool.lock);
        t->done = 1;
        pthread_cond_broadcast(&pool.finished);
        pthread_mutex_unlock(&pool.lock);
    }
    return NULL;
}

int64_t slim_task_size(void) { return (int64_t)sizeof(slim_task); } /* the ctypes mirror checks its layout */

/* Queue `t`, with at least `workers` worker threads started. Returns 0, or -1 where no worker could be started
 * (the task is not queued; the caller runs it itself). */
int slim_task_submit(slim_task *t, int workers) {
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&pool.lock);
    while (pool.workers < workers) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, pool_worker, NULL);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.workers++;
    }
    if (pool.workers == 0) {
        pthread_mutex_unlock(&pool.lock);
        return -1;
    }
    t->done = 0;
    t->next = NULL;
    if (pool.tail) pool.tail->next = t; else pool.head = t;
    pool.tail = t;
    pthread_cond_signal(&pool.work);
    pthread_mutex_unlock(&pool.lock);
    return 0;
}

/* Block until `t` is done (its outputs and sums are then written). */
void slim_task_wait(slim_task *t) {
    pthread_mutex_lock(&pool.lock);
    while (!t->done) pthread_cond_wait(&pool.finished, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
}

/* int8 codes in [-8, 7] -> compressed-tensors' int32 words, a row at a time (pack_words). cols % 8 == 0. Rows
 * [r0, r1). Returns how many codes lie outside [-8, 7] (their words are not meaningful; the caller refuses the
 * tensor), so no separate pass checks them. */
int64_t slim_pack_int4(const int8_t *codes, int64_t cols, int64_t r0, int64_t r1, int32_t *out) {
    const int64_t words = cols / 8;
    int64_t bad = 0;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *c = codes + r * cols;
        pack_words(c, words, out + r * words);
        /* code + 8 lies in [0, 15] exactly when the code is in range: OR the row's sums, count only if one is not
         * (a separate loop over the row, still in L1: counting inside the packing loop stops it vectorizing) */
        uint8_t high = 0;
        for (int64_t j = 0; j < cols; j++) high |= (uint8_t)(c[j] + 8);
        if (high & 0xF0u)
            for (int64_t j = 0; j < cols; j++) bad += c[j] < -8 || c[j] > 7;
    }
    return bad;
}
