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
#include <math.h>
#include <stdint.h>
#include <string.h>

#define SLIM_KERNELS_ABI 4

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

/* DeepSeek block FP8 -> bf16 (out_bf16) or fp32: out[r][c] = value(q[r][c]) * scale[r / bm][c / bn], the product
 * rounded once in fp32, then to bf16 (torch: the fp32 decode times the fp32 block scale, then copy_ to the model
 * dtype). Rows [r0, r1). Returns how many decoded values are NaN or infinite (materialize refuses those). */
int64_t slim_fp8_block_decode(const uint8_t *q, const float *scale, int64_t cols, int64_t bm, int64_t bn,
                              int64_t scale_cols, int64_t r0, int64_t r1, int out_bf16, void *out) {
    int64_t bad = 0;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *qr = q + r * cols;
        const float *sr = scale + (r / bm) * scale_cols;
        for (int64_t c0 = 0; c0 < cols; c0 += bn) {
            const float s = sr[c0 / bn];
            const int64_t n = cols - c0 < bn ? cols - c0 : bn;
            uint16_t *ob = (uint16_t *)out + r * cols + c0;
            float *of = (float *)out + r * cols + c0;
            for (int64_t j = 0; j < n; j++) {
                const float v = fp8_e4m3fn_f32(qr[c0 + j]) * s;
                bad += nonfinite(v);
                if (out_bf16) /* loop-invariant: the compiler keeps two vectorized loops */
                    ob[j] = f32_bf16(v);
                else
                    of[j] = v;
            }
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

/* Block FP8 straight to int4, the bf16 (or fp32) weight never stored: per group, the decode of
 * slim_fp8_block_decode (to bf16 when w_bf16) into a buffer, then slim_int4_quantize's group; the
 * bytes of the two in a row. With `packed` (group % 8 == 0), each group's codes are also packed into
 * [rows, cols / 8] int32 words as slim_pack_int4 packs them, while they are in cache. sums[2] counts decoded
 * values that are NaN or infinite (a corrupt checkpoint; the caller refuses it as materialize does). Groups may
 * span block columns. */
void slim_fp8_block_int4(const uint8_t *q, const float *scale, int64_t cols, int64_t bm, int64_t bn,
                         int64_t scale_cols, int w_bf16, int64_t group, int64_t r0, int64_t r1, int8_t *codes,
                         int32_t *packed, void *scale_out, int scale_bf16, double *sums) {
    float buf[SLIM_MAX_GROUP], c[SLIM_MAX_GROUP];
    double signal = 0.0, noise = 0.0;
    int64_t nonfinite_count = 0;
    const int64_t groups = cols / group;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *qr = q + r * cols;
        const float *sr = scale + (r / bm) * scale_cols;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t g0 = g * group;
            for (int64_t c0 = g0; c0 < g0 + group;) { /* one block column at a time */
                const float s = sr[c0 / bn];
                const int64_t end = (c0 / bn + 1) * bn < g0 + group ? (c0 / bn + 1) * bn : g0 + group;
                if (w_bf16) {
                    for (int64_t j = c0; j < end; j++)
                        buf[j - g0] = bf16_f32(f32_bf16(fp8_e4m3fn_f32(qr[j]) * s));
                } else {
                    for (int64_t j = c0; j < end; j++) buf[j - g0] = fp8_e4m3fn_f32(qr[j]) * s;
                }
                c0 = end;
            }
            const int64_t si = r * groups + g;
            float *sf = scale_bf16 ? NULL : (float *)scale_out + si;
            uint16_t *sb = scale_bf16 ? (uint16_t *)scale_out + si : NULL;
            const uint32_t amax_bits = group == 128
                ? int4_group(buf, 128, c, codes + r * cols + g0, sf, sb, &signal, &noise)
                : int4_group(buf, group, c, codes + r * cols + g0, sf, sb, &signal, &noise);
            if (amax_bits >= 0x7F800000u) /* an inf or NaN in the group (its absmax says so): count them */
                for (int64_t j = 0; j < group; j++) nonfinite_count += nonfinite(buf[j]);
            if (packed) pack_words(codes + r * cols + g0, group / 8, packed + r * (cols / 8) + g0 / 8);
        }
    }
    sums[0] = signal;
    sums[1] = noise;
    sums[2] = (double)nonfinite_count;
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
