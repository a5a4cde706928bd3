/* lcls-dl C kernels: fused per-frame accumulation, radial-profile pass,
 * per-panel common mode and peak finding.
 * See lcls_kernels.h for the contracts and lcls_dl/ingest/kernels.py for the
 * numpy reference implementation that defines the semantics.
 */
#include "lcls_kernels.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__) && defined(__x86_64__)
#include <emmintrin.h>
#define LCLS_HAVE_SSE2 1
#endif

int lcls_abi_version(void) { return LCLS_KERNELS_ABI; }

#define CONV_SCALAR(T, i) (((double)((const T *)frame)[i] - offset) * scale)
#define CONV_PIXEL(T, i)                                                      \
    (((double)((const T *)frame)[i] -                                        \
      (offset_px ? (double)offset_px[i]                                      \
       : offset_d ? offset + (double)offset_d[i] : offset)) *                 \
     (scale_px ? (double)scale_px[i] : scale))

/* chunk code: bin << 4 | (length - 1) */
#define CHUNK_BIN(c) ((int64_t)((c) >> 4))
#define CHUNK_LEN(c) ((int64_t)((c) & 15u) + 1)

/* per-bin integer work of the fused pass: sum, sum of squares, count, max raw */
#define W_SUM 0
#define W_SQ 1
#define W_CNT 2
#define W_MAX 3
#define W_NONE INT64_MIN

/* Software prefetch distance (pixels) of the SIMD loops: they consume a frame
 * too slowly for the hardware prefetcher to keep ahead (measured: -25 % time
 * per frame with frames streaming from memory). A prefetch never faults, and
 * the address is computed as an integer. */
#define PREFETCH_PX 768
#if defined(__GNUC__)
#define PREFETCH_FRAME(f, s)                                                   \
    __builtin_prefetch((const void *)((uintptr_t)((f) + (s)) + sizeof(*(f)) * PREFETCH_PX))
#else
#define PREFETCH_FRAME(f, s) ((void)0)
#endif

/* Candidate spans: pixel ranges within one bin holding at least one pixel
 * above cand_thr, with their largest (non-excluded) photon value. */
struct lcls_spans {
    int32_t *start, *len, *bin;
    double *max;
};

/* Smallest raw value g in [lo, hi] whose photon value (g - offset) * scale
 * exceeds thr, hi + 1 when none (scale > 0: monotonic in g). The comparison
 * is the one of the reference, so raw-value tests are exact. */
static int64_t raw_above(double thr, double offset, double scale, int64_t lo,
                         int64_t hi)
{
#define V(g) (((double)(g) - offset) * scale)
    if (thr != thr) return hi + 1;
    const double guess = floor(thr / scale + offset);
    int64_t g = !(guess > (double)lo) ? lo
                : guess > (double)hi ? hi + 1 : (int64_t)guess;
    while (g > lo && V(g - 1) > thr) g--;
    while (g <= hi && !(V(g) > thr)) g++;
    return g;
#undef V
}

/* --------------------------------------------------- integer frames, exact */

/* One chunk of an integer frame, pixel by pixel: raw values above raw_hot are
 * excluded, those >= raw_cand are lit. */
#define DEFINE_CHUNK_INT(NAME, T)                                             \
    static inline void NAME(const T *restrict f,                              \
                            const int16_t *restrict d, int64_t cd, int64_t s, \
                            int64_t len,                                      \
                            int64_t b, int64_t raw_hot, int64_t raw_cand,     \
                            int64_t *restrict w, int32_t *restrict excluded,  \
                            double offset, double scale,                      \
                            struct lcls_spans *sp, int64_t *ns, int64_t *nl)  \
    {                                                                         \
        int64_t a = 0, q = 0, c = 0, m = W_NONE, lit = 0;                     \
        for (int64_t i = s; i < s + len; i++) {                               \
            const int64_t x = (int64_t)f[i] - (d ? (int64_t)d[i] : 0) - cd;   \
            if (x <= raw_hot) {                                               \
                a += x; q += x * x; c++;                                      \
                m = x > m ? x : m;                                            \
                lit += x >= raw_cand;                                         \
            } else {                                                          \
                excluded[b]++;                                                \
            }                                                                 \
        }                                                                     \
        int64_t *wb = w + 4 * b;                                              \
        wb[W_SUM] += a; wb[W_SQ] += q; wb[W_CNT] += c;                        \
        wb[W_MAX] = m > wb[W_MAX] ? m : wb[W_MAX];                            \
        *nl += lit;                                                           \
        if (lit) {                                                            \
            sp->start[*ns] = (int32_t)s;                                      \
            sp->len[*ns] = (int32_t)len;                                      \
            sp->bin[*ns] = (int32_t)b;                                        \
            sp->max[*ns] = ((double)m - offset) * scale;                      \
            (*ns)++;                                                          \
        }                                                                     \
    }                                                                         \
    static void NAME##_all(const void *frame, const int16_t *restrict d,      \
                           const int32_t *restrict cp,                        \
                           const int16_t *restrict pt,                        \
                           int64_t k0, int64_t k1,                            \
                           const int32_t *restrict cs,                        \
                           const uint32_t *restrict cc, int64_t raw_hot,      \
                           int64_t raw_cand, int64_t *restrict w,             \
                           int32_t *restrict excluded, double offset,         \
                           double scale, struct lcls_spans *sp, int64_t *ns,  \
                           int64_t *nl)                                       \
    {                                                                         \
        for (int64_t k = k0; k < k1; k++)                                     \
            NAME((const T *)frame, d, pt ? (int64_t)pt[cp[k]] : 0, cs[k],      \
                 CHUNK_LEN(cc[k]), CHUNK_BIN(cc[k]),                          \
                 raw_hot, raw_cand, w, excluded, offset, scale, sp, ns, nl);  \
    }

DEFINE_CHUNK_INT(chunk_u8, uint8_t)
DEFINE_CHUNK_INT(chunk_i8, int8_t)
DEFINE_CHUNK_INT(chunk_u16, uint16_t)
DEFINE_CHUNK_INT(chunk_i16, int16_t)


/* Profile only: sums and counts of included raw values per bin. */
#define DEFINE_PCHUNK_INT(NAME, T)                                            \
    static void NAME(const void *frame, const int16_t *restrict d,            \
                     const int32_t *restrict cp, const int16_t *restrict pt,  \
                     int64_t k0, int64_t k1,                                  \
                     const int32_t *restrict cs, const uint32_t *restrict cc, \
                     int64_t raw_hot, int64_t *restrict w,                    \
                     int32_t *restrict excluded)                              \
    {                                                                         \
        const T *restrict f = (const T *)frame;                               \
        for (int64_t k = k0; k < k1; k++) {                                   \
            const int64_t s = cs[k], e = s + CHUNK_LEN(cc[k]);                \
            const int64_t b = CHUNK_BIN(cc[k]);                               \
            const int64_t cd = pt ? (int64_t)pt[cp[k]] : 0;                   \
            int64_t a = 0, c = 0;                                             \
            for (int64_t i = s; i < e; i++) {                                 \
                const int64_t x = (int64_t)f[i] - (d ? (int64_t)d[i] : 0) - cd; \
                if (x <= raw_hot) { a += x; c++; } else excluded[b]++;        \
            }                                                                 \
            w[2 * b] += a; w[2 * b + 1] += c;                                 \
        }                                                                     \
    }

DEFINE_PCHUNK_INT(pchunk_u8, uint8_t)
DEFINE_PCHUNK_INT(pchunk_i8, int8_t)
DEFINE_PCHUNK_INT(pchunk_u16, uint16_t)
DEFINE_PCHUNK_INT(pchunk_i16, int16_t)

#ifdef LCLS_HAVE_SSE2
/* uint16 frames (the common case): a chunk is read with two 128-bit loads and
 * a lane mask. When all its raw values are <= small (<= 16383 and not hot)
 * the sums (exact in 32-bit lanes), sum of squares, max and lit lanes come
 * from SSE2 reductions with no data-dependent branch; other chunks go pixel by
 * pixel. Needs 0 <= raw_hot and 1 <= raw_cand; chunks [0, n_fast) must not
 * read past the frame. */
static const uint16_t lane_mask_src[32] = {
    0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF,
    0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};

/* a chunk of the SIMD loops that needs the exact pixel-by-pixel path (rare:
 * kept out of line so that the loops keep their state in registers) */
#if defined(__GNUC__)
__attribute__((noinline))
#endif
static void chunk_u16_slow(const uint16_t *f, const int16_t *d, int64_t cd, int64_t s,
                           int64_t len, int64_t b,
                           int64_t raw_hot, int64_t raw_cand, int64_t *w,
                           int32_t *excluded, double offset, double scale,
                           struct lcls_spans *sp, int64_t *ns, int64_t *nl)
{
    chunk_u16(f, d, cd, s, len, b, raw_hot, raw_cand, w, excluded, offset, scale, sp, ns, nl);
}

static inline int64_t hsum_epi32(__m128i x)
{
    x = _mm_add_epi32(x, _mm_srli_si128(x, 8));
    x = _mm_add_epi32(x, _mm_srli_si128(x, 4));
    return (int64_t)_mm_cvtsi128_si32(x);
}

static void acc_sse_u16(const uint16_t *restrict f, int64_t n_fast,
                        const int32_t *restrict cs, const uint32_t *restrict cc,
                        int64_t raw_hot, int64_t raw_cand, int64_t *restrict w,
                        int32_t *restrict excluded, double offset, double scale,
                        struct lcls_spans *sp, int64_t *ns_io, int64_t *nl_io)
{
    const __m128i zero = _mm_setzero_si128(), ones = _mm_set1_epi16(1);
    const int64_t small = raw_hot < 16383 ? raw_hot : 16383;
    const __m128i smallv = _mm_set1_epi16((short)(uint16_t)small);
    const __m128i candm1 = _mm_set1_epi16((short)(uint16_t)(raw_cand - 1));
    __m128i notlit = zero; /* minus the not-lit lanes of the fast chunks */
    int32_t *restrict span_start = sp->start, *restrict span_len = sp->len;
    int32_t *restrict span_bin = sp->bin;
    double *restrict span_max = sp->max;
    int64_t ns = *ns_io, nl = *nl_io, n_slow = 0;
    for (int64_t k = 0; k < n_fast; k++) {
        const int64_t s = cs[k];
        const uint32_t code = cc[k];
        const int64_t b = CHUNK_BIN(code), len = CHUNK_LEN(code);
        PREFETCH_FRAME(f, s);
        const __m128i mlo = _mm_loadu_si128((const __m128i *)(lane_mask_src + 16 - len));
        const __m128i mhi = _mm_loadu_si128((const __m128i *)(lane_mask_src + 24 - len));
        const __m128i lo = _mm_and_si128(_mm_loadu_si128((const __m128i *)(f + s)), mlo);
        const __m128i hi = _mm_and_si128(_mm_loadu_si128((const __m128i *)(f + s + 8)), mhi);
        const __m128i over = _mm_or_si128(_mm_subs_epu16(lo, smallv), _mm_subs_epu16(hi, smallv));
        if (_mm_movemask_epi8(_mm_cmpeq_epi16(over, zero)) != 0xFFFF) {
            chunk_u16_slow(f, NULL, 0, s, len, b, raw_hot, raw_cand, w, excluded, offset,
                           scale, sp, &ns, &nl);
            n_slow++;
            continue;
        }
        /* all lanes <= 16383: signed 16-bit arithmetic is exact */
        const __m128i s4 = _mm_add_epi32(_mm_madd_epi16(lo, ones), _mm_madd_epi16(hi, ones));
        const __m128i q4 = _mm_add_epi32(_mm_madd_epi16(lo, lo), _mm_madd_epi16(hi, hi));
        __m128i t = _mm_add_epi32(_mm_unpacklo_epi64(s4, q4), _mm_unpackhi_epi64(s4, q4));
        t = _mm_add_epi32(t, _mm_srli_si128(t, 4)); /* lane 0: sum, lane 2: squares */
        const int64_t a = (int64_t)_mm_cvtsi128_si32(t);
        const int64_t q = (int64_t)(uint32_t)_mm_cvtsi128_si32(_mm_srli_si128(t, 8));
        __m128i mx = _mm_max_epi16(lo, hi);
        mx = _mm_max_epi16(mx, _mm_srli_si128(mx, 8));
        mx = _mm_max_epi16(mx, _mm_srli_si128(mx, 4));
        mx = _mm_max_epi16(mx, _mm_srli_si128(mx, 2));
        const int64_t m = (int64_t)(int16_t)_mm_cvtsi128_si32(mx);
        /* not lit: raw <= raw_cand - 1 (masked lanes are 0: never lit) */
        const __m128i dl = _mm_cmpeq_epi16(_mm_subs_epu16(lo, candm1), zero);
        const __m128i dh = _mm_cmpeq_epi16(_mm_subs_epu16(hi, candm1), zero);
        notlit = _mm_add_epi32(notlit, _mm_madd_epi16(_mm_add_epi16(dl, dh), ones));
        const int has_lit = _mm_movemask_epi8(_mm_and_si128(dl, dh)) != 0xFFFF;
        int64_t *wb = w + 4 * b;
        wb[W_SUM] += a; wb[W_SQ] += q; wb[W_CNT] += len;
        wb[W_MAX] = m > wb[W_MAX] ? m : wb[W_MAX];
        span_start[ns] = (int32_t)s; /* written always, kept when lit */
        span_len[ns] = (int32_t)len;
        span_bin[ns] = (int32_t)b;
        span_max[ns] = ((double)m - offset) * scale;
        ns += has_lit;
    }
    *ns_io = ns;
    *nl_io = nl + 16 * (n_fast - n_slow) + hsum_epi32(notlit);
}

/* profile only: sums of raw values per bin (chunks whose raw values are all
 * <= small = min(raw_hot, 32767)), the others pixel by pixel */
static void pacc_sse_u16(const uint16_t *restrict f, int64_t n_fast,
                         const int32_t *restrict cs, const uint32_t *restrict cc,
                         int64_t raw_hot, int64_t *restrict w,
                         int32_t *restrict excluded)
{
    const __m128i zero = _mm_setzero_si128(), ones = _mm_set1_epi16(1);
    const int64_t small = raw_hot < 32767 ? raw_hot : 32767;
    const __m128i smallv = _mm_set1_epi16((short)(uint16_t)small);
    for (int64_t k = 0; k < n_fast; k++) {
        const int64_t s = cs[k];
        const uint32_t code = cc[k];
        const int64_t b = CHUNK_BIN(code), len = CHUNK_LEN(code);
        PREFETCH_FRAME(f, s);
        const __m128i mlo = _mm_loadu_si128((const __m128i *)(lane_mask_src + 16 - len));
        const __m128i mhi = _mm_loadu_si128((const __m128i *)(lane_mask_src + 24 - len));
        const __m128i lo = _mm_and_si128(_mm_loadu_si128((const __m128i *)(f + s)), mlo);
        const __m128i hi = _mm_and_si128(_mm_loadu_si128((const __m128i *)(f + s + 8)), mhi);
        const __m128i over = _mm_or_si128(_mm_subs_epu16(lo, smallv), _mm_subs_epu16(hi, smallv));
        if (_mm_movemask_epi8(_mm_cmpeq_epi16(over, zero)) != 0xFFFF) {
            pchunk_u16(f, NULL, NULL, NULL, k, k + 1, cs, cc, raw_hot, w, excluded);
            continue;
        }
        w[2 * b] += hsum_epi32(_mm_add_epi32(_mm_madd_epi16(lo, ones), _mm_madd_epi16(hi, ones)));
        w[2 * b + 1] += len;
    }
}
#endif

#if defined(LCLS_HAVE_SSE2) && defined(__GNUC__)
/* The same two kernels with AVX2 (one 256-bit load per chunk), chosen at run
 * time when the CPU has it; the build needs no -mavx2. */
#define LCLS_HAVE_AVX2 1
#include <immintrin.h>

/* (always inlined into two specialisations: with and without d) */
__attribute__((target("avx2"), always_inline))
static inline void acc_avx2_u16_body(const uint16_t *restrict f, const int16_t *restrict d,
                         const int32_t *restrict cp, const int16_t *restrict pt,
                         int64_t n_fast,
                         const int32_t *restrict cs, const uint32_t *restrict cc,
                         int64_t raw_hot, int64_t raw_cand, int64_t *restrict w,
                         int32_t *restrict excluded, double offset, double scale,
                         struct lcls_spans *sp, int64_t *ns_io, int64_t *nl_io)
{
    const __m256i zero = _mm256_setzero_si256(), ones = _mm256_set1_epi16(1);
    const int64_t small = raw_hot < 16383 ? raw_hot : 16383;
    const __m256i smallv = _mm256_set1_epi16((short)(uint16_t)small);
    const int64_t cm1 = raw_cand - 1 < 65535 ? raw_cand - 1 : 65535;
    const __m256i candm1 = _mm256_set1_epi16((short)(uint16_t)cm1);
    __m256i notlit = zero;
    int32_t *restrict span_start = sp->start, *restrict span_len = sp->len;
    int32_t *restrict span_bin = sp->bin;
    double *restrict span_max = sp->max;
    int64_t ns = *ns_io, nl = *nl_io, n_slow = 0;
    for (int64_t k = 0; k < n_fast; k++) {
        const int64_t s = cs[k];
        const uint32_t code = cc[k];
        const int64_t b = CHUNK_BIN(code), len = CHUNK_LEN(code);
        PREFETCH_FRAME(f, s);
        const __m256i m = _mm256_loadu_si256((const __m256i *)(lane_mask_src + 16 - len));
        __m256i x, over;
        int64_t cd = 0;
        if (d || pt) {
            /* y = raw - d: exact when raw <= 32767 (sign bit clear) and the
             * signed saturating difference lies in [0, small] (a saturated
             * one is -32768 or 32767, outside) */
            __m256i dv;
            if (d) {
                PREFETCH_FRAME(d, s);
                dv = _mm256_loadu_si256((const __m256i *)(d + s));
            } else { /* one integer offset for the chunk (its panel's) */
                cd = pt[cp[k]];
                dv = _mm256_set1_epi16((short)cd);
            }
            const __m256i raw = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(f + s)), m);
            x = _mm256_and_si256(_mm256_subs_epi16(raw, dv), m);
            over = _mm256_or_si256(_mm256_subs_epu16(x, smallv),
                                   _mm256_and_si256(raw, _mm256_set1_epi16((short)0x8000)));
        } else {
            x = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(f + s)), m);
            over = _mm256_subs_epu16(x, smallv);
        }
        if ((uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi16(over, zero)) != 0xFFFFFFFFu) {
            chunk_u16_slow(f, d, cd, s, len, b, raw_hot, raw_cand, w, excluded, offset,
                           scale, sp, &ns, &nl);
            n_slow++;
            continue;
        }
        const __m256i s8 = _mm256_madd_epi16(x, ones), q8 = _mm256_madd_epi16(x, x);
        __m256i t = _mm256_add_epi32(_mm256_unpacklo_epi64(s8, q8), _mm256_unpackhi_epi64(s8, q8));
        t = _mm256_add_epi32(t, _mm256_srli_si256(t, 4));
        const __m128i t2 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        const int64_t a = (int64_t)_mm_cvtsi128_si32(t2);
        const int64_t q = (int64_t)(uint32_t)_mm_cvtsi128_si32(_mm_srli_si128(t2, 8));
        __m128i mx = _mm_max_epi16(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
        mx = _mm_max_epi16(mx, _mm_srli_si128(mx, 8));
        mx = _mm_max_epi16(mx, _mm_srli_si128(mx, 4));
        mx = _mm_max_epi16(mx, _mm_srli_si128(mx, 2));
        const int64_t mraw = (int64_t)(int16_t)_mm_cvtsi128_si32(mx);
        const __m256i d = _mm256_cmpeq_epi16(_mm256_subs_epu16(x, candm1), zero);
        notlit = _mm256_add_epi32(notlit, _mm256_madd_epi16(d, ones));
        const int has_lit = (uint32_t)_mm256_movemask_epi8(d) != 0xFFFFFFFFu;
        int64_t *wb = w + 4 * b;
        wb[W_SUM] += a; wb[W_SQ] += q; wb[W_CNT] += len;
        wb[W_MAX] = mraw > wb[W_MAX] ? mraw : wb[W_MAX];
        span_start[ns] = (int32_t)s; /* written always, kept when lit */
        span_len[ns] = (int32_t)len;
        span_bin[ns] = (int32_t)b;
        span_max[ns] = ((double)mraw - offset) * scale;
        ns += has_lit;
    }
    const __m128i nl4 = _mm_add_epi32(_mm256_castsi256_si128(notlit), _mm256_extracti128_si256(notlit, 1));
    *ns_io = ns;
    *nl_io = nl + 16 * (n_fast - n_slow) + hsum_epi32(nl4);
}

__attribute__((target("avx2")))
static void acc_avx2_u16(const uint16_t *restrict f, const int16_t *restrict d,
                         int64_t n_fast, const int32_t *restrict cs,
                         const uint32_t *restrict cc, int64_t raw_hot, int64_t raw_cand,
                         int64_t *restrict w, int32_t *restrict excluded, double offset,
                         double scale, struct lcls_spans *sp, int64_t *ns_io, int64_t *nl_io)
{
    if (d)
        acc_avx2_u16_body(f, d, NULL, NULL, n_fast, cs, cc, raw_hot, raw_cand, w, excluded,
                          offset, scale, sp, ns_io, nl_io);
    else
        acc_avx2_u16_body(f, NULL, NULL, NULL, n_fast, cs, cc, raw_hot, raw_cand, w, excluded, offset,
                          scale, sp, ns_io, nl_io);
}

/* per-panel integer offsets: one per chunk, pt[cp[k]] */
__attribute__((target("avx2")))
static void acc_avx2_u16_pt(const uint16_t *restrict f, const int32_t *restrict cp,
                            const int16_t *restrict pt, int64_t n_fast,
                            const int32_t *restrict cs, const uint32_t *restrict cc,
                            int64_t raw_hot, int64_t raw_cand, int64_t *restrict w,
                            int32_t *restrict excluded, double offset, double scale,
                            struct lcls_spans *sp, int64_t *ns_io, int64_t *nl_io)
{
    acc_avx2_u16_body(f, NULL, cp, pt, n_fast, cs, cc, raw_hot, raw_cand, w, excluded,
                      offset, scale, sp, ns_io, nl_io);
}

__attribute__((target("avx2")))
static void pacc_avx2_u16(const uint16_t *restrict f, int64_t n_fast,
                          const int32_t *restrict cs, const uint32_t *restrict cc,
                          int64_t raw_hot, int64_t *restrict w,
                          int32_t *restrict excluded)
{
    const __m256i zero = _mm256_setzero_si256(), ones = _mm256_set1_epi16(1);
    const int64_t small = raw_hot < 32767 ? raw_hot : 32767;
    const __m256i smallv = _mm256_set1_epi16((short)(uint16_t)small);
    for (int64_t k = 0; k < n_fast; k++) {
        const int64_t s = cs[k];
        const uint32_t code = cc[k];
        const int64_t b = CHUNK_BIN(code), len = CHUNK_LEN(code);
        PREFETCH_FRAME(f, s);
        const __m256i m = _mm256_loadu_si256((const __m256i *)(lane_mask_src + 16 - len));
        const __m256i x = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(f + s)), m);
        if ((uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi16(_mm256_subs_epu16(x, smallv), zero)) != 0xFFFFFFFFu) {
            pchunk_u16(f, NULL, NULL, NULL, k, k + 1, cs, cc, raw_hot, w, excluded);
            continue;
        }
        const __m256i s8 = _mm256_madd_epi16(x, ones);
        const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
        w[2 * b] += hsum_epi32(s4);
        w[2 * b + 1] += len;
    }
}

static int have_avx2(void)
{
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return known;
}
#endif

/* SIMD level cap (tests run every path on any machine) */
static int simd_cap = 2;

static int simd_level(void)
{
    int level = 0;
#ifdef LCLS_HAVE_SSE2
    level = 1;
#ifdef LCLS_HAVE_AVX2
    if (have_avx2()) level = 2;
#endif
#endif
    return level < simd_cap ? level : simd_cap;
}

int lcls_simd_level(int max_level)
{
    if (max_level >= 0) simd_cap = max_level;
    return simd_level();
}


#ifdef LCLS_HAVE_SSE2
/* Chunks [0, n_fast) start at least 16 pixels before the frame's end. */
static int64_t fast_chunks(const int32_t *cs, int64_t n_chunks, int64_t n_pixels)
{
    int64_t k = n_chunks;
    while (k > 0 && (int64_t)cs[k - 1] + 16 > n_pixels) k--;
    return k;
}
#endif

/* Integer frame with a scalar offset (plus, optionally, integer per-pixel
 * offsets offset_d) and scale > 0 whose photon values are finite: the exact
 * integer paths apply, on raw - offset_d. Sets the range of those values. */
static int int_path(int dtype, const float *offset_px, const float *scale_px,
                    const int16_t *offset_d, double offset, double scale,
                    int64_t *lo, int64_t *hi)
{
    static const int64_t los[4] = {0, -128, 0, -32768};
    static const int64_t his[4] = {255, 127, 65535, 32767};
    if (offset_px || scale_px || !(scale > 0) || dtype < LCLS_U8 || dtype > LCLS_I16)
        return 0;
    *lo = los[dtype] - (offset_d ? 32767 : 0);
    *hi = his[dtype] + (offset_d ? 32768 : 0);
    return isfinite(((double)*lo - offset) * scale) && isfinite(((double)*hi - offset) * scale);
}

/* ------------------------------------------- any dtype, float64 arithmetic */

#define DEFINE_ACC_DBL(NAME, CONV, T)                                         \
    static void NAME(const void *restrict frame, int64_t n_chunks,            \
                     const int32_t *restrict cs, const uint32_t *restrict cc, \
                     const float *restrict offset_px,                         \
                     const float *restrict scale_px,                          \
                     const int16_t *restrict offset_d, double offset,         \
                     double scale, double hot, double cand_thr,               \
                     double *restrict sum, double *restrict sumsq,            \
                     int32_t *restrict excluded, double *restrict bmax,       \
                     struct lcls_spans *sp, int64_t *counts)                  \
    {                                                                         \
        (void)offset_px; (void)scale_px; (void)offset_d;                      \
        int64_t ns = 0, nl = 0, nnf = 0;                                      \
        for (int64_t k = 0; k < n_chunks; k++) {                              \
            const int64_t s = cs[k], e = s + CHUNK_LEN(cc[k]);                \
            const int64_t b = CHUNK_BIN(cc[k]);                               \
            double ps = 0.0, pq = 0.0, pm = -HUGE_VAL;                        \
            int64_t lit = 0;                                                  \
            for (int64_t i = s; i < e; i++) {                                 \
                const double v = CONV(T, i);                                  \
                if (v <= hot && v >= -DBL_MAX) {                              \
                    ps += v; pq += v * v; pm = v > pm ? v : pm;               \
                    lit += v > cand_thr;                                      \
                } else {                                                      \
                    excluded[b]++;                                            \
                    nnf += !isfinite(v);                                      \
                }                                                             \
            }                                                                 \
            sum[b] += ps; sumsq[b] += pq;                                     \
            if (pm > bmax[b]) bmax[b] = pm;                                   \
            nl += lit;                                                        \
            if (lit) {                                                        \
                sp->start[ns] = (int32_t)s;                                   \
                sp->len[ns] = (int32_t)(e - s);                               \
                sp->bin[ns] = (int32_t)b;                                     \
                sp->max[ns] = pm;                                             \
                ns++;                                                         \
            }                                                                 \
        }                                                                     \
        counts[0] = ns; counts[1] = nl; counts[2] = nnf;                      \
    }

#define DEFINE_PACC_DBL(NAME, CONV, T)                                        \
    static void NAME(const void *restrict frame, int64_t n_chunks,            \
                     const int32_t *restrict cs, const uint32_t *restrict cc, \
                     const float *restrict offset_px,                         \
                     const float *restrict scale_px,                          \
                     const int16_t *restrict offset_d, double offset,         \
                     double scale, double hot, double *restrict sum,          \
                     int32_t *restrict excluded, int64_t *counts)             \
    {                                                                         \
        (void)offset_px; (void)scale_px; (void)offset_d;                      \
        int64_t nnf = 0;                                                      \
        for (int64_t k = 0; k < n_chunks; k++) {                              \
            const int64_t s = cs[k], e = s + CHUNK_LEN(cc[k]);                \
            const int64_t b = CHUNK_BIN(cc[k]);                               \
            double ps = 0.0;                                                  \
            for (int64_t i = s; i < e; i++) {                                 \
                const double v = CONV(T, i);                                  \
                if (v <= hot && v >= -DBL_MAX) {                              \
                    ps += v;                                                  \
                } else {                                                      \
                    excluded[b]++;                                            \
                    nnf += !isfinite(v);                                      \
                }                                                             \
            }                                                                 \
            sum[b] += ps;                                                     \
        }                                                                     \
        counts[0] = nnf;                                                      \
    }

#define DEFINE_DBL_SET(SUFFIX, T)                                             \
    DEFINE_ACC_DBL(acc_s_##SUFFIX, CONV_SCALAR, T)                            \
    DEFINE_ACC_DBL(acc_p_##SUFFIX, CONV_PIXEL, T)                             \
    DEFINE_PACC_DBL(pacc_s_##SUFFIX, CONV_SCALAR, T)                          \
    DEFINE_PACC_DBL(pacc_p_##SUFFIX, CONV_PIXEL, T)

DEFINE_DBL_SET(u8, uint8_t)
DEFINE_DBL_SET(i8, int8_t)
DEFINE_DBL_SET(u16, uint16_t)
DEFINE_DBL_SET(i16, int16_t)
DEFINE_DBL_SET(u32, uint32_t)
DEFINE_DBL_SET(i32, int32_t)
DEFINE_DBL_SET(f32, float)
DEFINE_DBL_SET(f64, double)

#ifdef LCLS_HAVE_AVX2
/* uint16 frames with a per-pixel offset and/or scale (dark frames, gain
 * maps): a chunk's 16 photon values in four 4-lane float64 vectors (the
 * reference's arithmetic), sums and max reduced per chunk; a chunk holding a
 * hot or non-finite pixel is redone pixel by pixel. Chunks [0, n_fast) must
 * not read past the frame. Updates sum, sumsq, bmax, excluded and the spans;
 * adds to *ns, *nl, *nnf. */
__attribute__((target("avx2,popcnt")))
static void acc_avx2_u16_px(const uint16_t *restrict f, int64_t n_fast,
                            const int32_t *restrict cs, const uint32_t *restrict cc,
                            const float *restrict offset_px,
                            const float *restrict scale_px, double offset,
                            double scale, double hot, double cand_thr,
                            double *restrict sum, double *restrict sumsq,
                            int32_t *restrict excluded, double *restrict bmax,
                            struct lcls_spans *sp, int64_t *ns_io, int64_t *nl_io,
                            int64_t *nnf_io)
{
    int32_t *restrict span_start = sp->start, *restrict span_len = sp->len;
    int32_t *restrict span_bin = sp->bin;
    double *restrict span_max = sp->max;
    const __m256d hot_v = _mm256_set1_pd(hot), low_v = _mm256_set1_pd(-DBL_MAX);
    const __m256d cand_v = _mm256_set1_pd(cand_thr), ninf = _mm256_set1_pd(-HUGE_VAL);
    const __m256d off_s = _mm256_set1_pd(offset), sc_s = _mm256_set1_pd(scale);
    const __m256i idx0 = _mm256_set_epi64x(3, 2, 1, 0);
    int64_t ns = *ns_io, nl = *nl_io, nnf = *nnf_io;
    for (int64_t k = 0; k < n_fast; k++) {
        const int64_t s = cs[k];
        const uint32_t code = cc[k];
        const int64_t b = CHUNK_BIN(code), len = CHUNK_LEN(code);
        PREFETCH_FRAME(f, s);
        if (offset_px) PREFETCH_FRAME(offset_px, s);
        if (scale_px) PREFETCH_FRAME(scale_px, s);
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(f + s));
        const __m128i r8[2] = {_mm256_castsi256_si128(raw), _mm256_extracti128_si256(raw, 1)};
        const __m256i len_v = _mm256_set1_epi64x(len);
        __m256d a = _mm256_setzero_pd(), q = _mm256_setzero_pd(), m = ninf;
        int bad = 0, lit = 0;
        for (int g = 0; g < 4; g++) {
            const __m128i r4 = (g & 1) ? _mm_srli_si128(r8[g >> 1], 8) : r8[g >> 1];
            const __m256d x = _mm256_cvtepi32_pd(_mm_cvtepu16_epi32(r4));
            const __m256d off = offset_px ? _mm256_cvtps_pd(_mm_loadu_ps(offset_px + s + 4 * g)) : off_s;
            const __m256d sc = scale_px ? _mm256_cvtps_pd(_mm_loadu_ps(scale_px + s + 4 * g)) : sc_s;
            const __m256d v = _mm256_mul_pd(_mm256_sub_pd(x, off), sc);
            const __m256d valid = _mm256_castsi256_pd(
                _mm256_cmpgt_epi64(len_v, _mm256_add_epi64(idx0, _mm256_set1_epi64x(4 * g))));
            const __m256d good = _mm256_and_pd(_mm256_cmp_pd(v, hot_v, _CMP_LE_OQ),
                                               _mm256_cmp_pd(v, low_v, _CMP_GE_OQ));
            bad |= _mm256_movemask_pd(_mm256_andnot_pd(good, valid));
            lit += __builtin_popcount((unsigned)_mm256_movemask_pd(
                _mm256_and_pd(_mm256_cmp_pd(v, cand_v, _CMP_GT_OQ), valid)));
            const __m256d vz = _mm256_and_pd(v, valid);
            a = _mm256_add_pd(a, vz);
            q = _mm256_add_pd(q, _mm256_mul_pd(vz, vz));
            m = _mm256_max_pd(m, _mm256_blendv_pd(ninf, v, valid));
        }
        if (bad) { /* pixel by pixel, with the exclusions */
            double ps = 0.0, pq = 0.0, pm = -HUGE_VAL;
            int64_t nlit = 0;
            for (int64_t i = s; i < s + len; i++) {
                const double v = ((double)f[i] - (offset_px ? (double)offset_px[i] : offset)) *
                                 (scale_px ? (double)scale_px[i] : scale);
                if (v <= hot && v >= -DBL_MAX) {
                    ps += v; pq += v * v; pm = v > pm ? v : pm;
                    nlit += v > cand_thr;
                } else {
                    excluded[b]++;
                    nnf += !isfinite(v);
                }
            }
            sum[b] += ps; sumsq[b] += pq;
            bmax[b] = pm > bmax[b] ? pm : bmax[b];
            nl += nlit;
            if (nlit) {
                span_start[ns] = (int32_t)s; span_len[ns] = (int32_t)len;
                span_bin[ns] = (int32_t)b; span_max[ns] = pm;
                ns++;
            }
            continue;
        }
        __m128d a2 = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
        __m128d q2 = _mm_add_pd(_mm256_castpd256_pd128(q), _mm256_extractf128_pd(q, 1));
        __m128d m2 = _mm_max_pd(_mm256_castpd256_pd128(m), _mm256_extractf128_pd(m, 1));
        a2 = _mm_add_sd(a2, _mm_unpackhi_pd(a2, a2));
        q2 = _mm_add_sd(q2, _mm_unpackhi_pd(q2, q2));
        m2 = _mm_max_sd(m2, _mm_unpackhi_pd(m2, m2));
        const double pm = _mm_cvtsd_f64(m2);
        sum[b] += _mm_cvtsd_f64(a2);
        sumsq[b] += _mm_cvtsd_f64(q2);
        bmax[b] = pm > bmax[b] ? pm : bmax[b];
        nl += lit;
        span_start[ns] = (int32_t)s; /* written always, kept when lit */
        span_len[ns] = (int32_t)len;
        span_bin[ns] = (int32_t)b;
        span_max[ns] = pm;
        ns += lit > 0;
    }
    *ns_io = ns; *nl_io = nl; *nnf_io = nnf;
}
#endif

/* ------------------------------------------------------------ entry points */

int lcls_accumulate(const void *frame, int dtype, int64_t n_pixels,
                    int64_t n_chunks, const int32_t *chunk_start,
                    const uint32_t *chunk_code, int32_t n_bins,
                    const float *offset_px, const float *scale_px,
                    const int16_t *offset_d,
                    const int32_t *chunk_panel, const int16_t *panel_t,
                    double offset, double scale, double hot, double cand_thr,
                    double *sum, double *sumsq, int32_t *excluded, double *bmax,
                    int64_t *work,
                    int32_t *span_start, int32_t *span_len, double *span_max,
                    int32_t *span_bin, int64_t *counts, double *vmax)
{
    struct lcls_spans spans = {span_start, span_len, span_bin, span_max};
    int64_t lo, hi;
    (void)n_pixels; /* only the SIMD paths need it */
    if (dtype < LCLS_U8 || dtype > LCLS_F64) return -1;
    if (panel_t && (offset_d || !chunk_panel ||
                    !int_path(dtype, offset_px, scale_px, panel_t, offset, scale, &lo, &hi)))
        return -3;
    if (!(hot <= DBL_MAX)) hot = DBL_MAX; /* +inf pixels are never "not hot" */
    memset(excluded, 0, sizeof(int32_t) * (size_t)n_bins);

    if (int_path(dtype, offset_px, scale_px, offset_d ? offset_d : panel_t, offset, scale,
                 &lo, &hi)) {
        const int64_t raw_hot = raw_above(hot, offset, scale, lo, hi) - 1;
        const int64_t raw_cand = raw_above(cand_thr, offset, scale, lo, hi);
        int64_t ns = 0, nl = 0, k0 = 0;
        for (int32_t b = 0; b < n_bins; b++) {
            work[4 * b + W_SUM] = work[4 * b + W_SQ] = work[4 * b + W_CNT] = 0;
            work[4 * b + W_MAX] = W_NONE;
        }
#ifdef LCLS_HAVE_SSE2
        const int level = simd_level();
        /* integer per-pixel offsets: AVX2 only (SSE2 and scalar: pixel by pixel) */
        if (level >= (offset_d || panel_t ? 2 : 1) && dtype == LCLS_U16 && raw_hot >= 0 &&
            raw_cand >= 1) {
            k0 = fast_chunks(chunk_start, n_chunks, n_pixels);
#ifdef LCLS_HAVE_AVX2
            if (level >= 2 && panel_t)
                acc_avx2_u16_pt((const uint16_t *)frame, chunk_panel, panel_t, k0,
                                chunk_start, chunk_code, raw_hot, raw_cand, work, excluded,
                                offset, scale, &spans, &ns, &nl);
            else if (level >= 2)
                acc_avx2_u16((const uint16_t *)frame, offset_d, k0,
                             chunk_start, chunk_code,
                             raw_hot, raw_cand, work, excluded, offset, scale, &spans, &ns, &nl);
            else
#endif
            acc_sse_u16((const uint16_t *)frame, k0, chunk_start, chunk_code, raw_hot,
                        raw_cand, work, excluded, offset, scale, &spans, &ns, &nl);
        }
#endif
#define DISPATCH(SUFFIX)                                                      \
    chunk_##SUFFIX##_all(frame, offset_d, chunk_panel, panel_t, k0, n_chunks, chunk_start, chunk_code, raw_hot, \
                         raw_cand, work, excluded, offset, scale, &spans, &ns, &nl)
        switch (dtype) {
        case LCLS_U8: DISPATCH(u8); break;
        case LCLS_I8: DISPATCH(i8); break;
        case LCLS_U16: DISPATCH(u16); break;
        default: DISPATCH(i16); break;
        }
#undef DISPATCH
        double vm = -HUGE_VAL;
        const double off2 = offset * offset, scale2 = scale * scale;
        for (int32_t b = 0; b < n_bins; b++) {
            const int64_t *wb = work + 4 * b;
            const double a = (double)wb[W_SUM], c = (double)wb[W_CNT];
            sum[b] = (a - c * offset) * scale;
            sumsq[b] = (((double)wb[W_SQ] - 2.0 * offset * a) + c * off2) * scale2;
            bmax[b] = wb[W_MAX] == W_NONE ? -HUGE_VAL : ((double)wb[W_MAX] - offset) * scale;
            vm = bmax[b] > vm ? bmax[b] : vm;
        }
        counts[0] = ns; counts[1] = nl; counts[2] = 0;
        *vmax = vm;
        return 0;
    }

    const int per_pixel = offset_px != NULL || scale_px != NULL || offset_d != NULL;
    memset(sum, 0, sizeof(double) * (size_t)n_bins);
    memset(sumsq, 0, sizeof(double) * (size_t)n_bins);
    for (int32_t b = 0; b < n_bins; b++) bmax[b] = -HUGE_VAL;
#ifdef LCLS_HAVE_AVX2
    if (per_pixel && !offset_d && dtype == LCLS_U16 && simd_level() >= 2) {
        /* SIMD chunks, then the frame's last chunks by the scalar code */
        int64_t ns = 0, nl = 0, nnf = 0, tail[3];
        const int64_t k0 = fast_chunks(chunk_start, n_chunks, n_pixels);
        acc_avx2_u16_px((const uint16_t *)frame, k0, chunk_start, chunk_code, offset_px,
                        scale_px, offset, scale, hot, cand_thr, sum, sumsq, excluded, bmax,
                        &spans, &ns, &nl, &nnf);
        struct lcls_spans rest = {span_start + ns, span_len + ns, span_bin + ns, span_max + ns};
        acc_p_u16(frame, n_chunks - k0, chunk_start + k0, chunk_code + k0, offset_px, scale_px,
                  NULL, offset, scale, hot, cand_thr, sum, sumsq, excluded, bmax, &rest, tail);
        counts[0] = ns + tail[0]; counts[1] = nl + tail[1]; counts[2] = nnf + tail[2];
        double vm = -HUGE_VAL;
        for (int32_t b = 0; b < n_bins; b++) vm = bmax[b] > vm ? bmax[b] : vm;
        *vmax = vm;
        return 0;
    }
#endif
#define DISPATCH(SUFFIX)                                                      \
    (per_pixel ? acc_p_##SUFFIX : acc_s_##SUFFIX)(                            \
        frame, n_chunks, chunk_start, chunk_code, offset_px, scale_px, offset_d, \
        offset, scale, hot, cand_thr, sum, sumsq, excluded, bmax, &spans, counts)
    switch (dtype) {
    case LCLS_U8: DISPATCH(u8); break;
    case LCLS_I8: DISPATCH(i8); break;
    case LCLS_U16: DISPATCH(u16); break;
    case LCLS_I16: DISPATCH(i16); break;
    case LCLS_U32: DISPATCH(u32); break;
    case LCLS_I32: DISPATCH(i32); break;
    case LCLS_F32: DISPATCH(f32); break;
    default: DISPATCH(f64); break;
    }
#undef DISPATCH
    double vm = -HUGE_VAL;
    for (int32_t b = 0; b < n_bins; b++) vm = bmax[b] > vm ? bmax[b] : vm;
    *vmax = vm;
    return 0;
}

int lcls_profile_accumulate(const void *frame, int dtype, int64_t n_pixels,
                            int64_t n_chunks, const int32_t *chunk_start,
                            const uint32_t *chunk_code, int32_t n_bins,
                            const float *offset_px, const float *scale_px,
                            const int16_t *offset_d,
                            const int32_t *chunk_panel, const int16_t *panel_t,
                            double offset, double scale, double hot,
                            double *sum, int32_t *excluded, int64_t *work,
                            int64_t *counts)
{
    int64_t lo, hi;
    (void)n_pixels; /* only the SIMD paths need it */
    if (dtype < LCLS_U8 || dtype > LCLS_F64) return -1;
    if (panel_t && (offset_d || !chunk_panel ||
                    !int_path(dtype, offset_px, scale_px, panel_t, offset, scale, &lo, &hi)))
        return -3;
    if (!(hot <= DBL_MAX)) hot = DBL_MAX;
    memset(excluded, 0, sizeof(int32_t) * (size_t)n_bins);

    if (int_path(dtype, offset_px, scale_px, offset_d ? offset_d : panel_t, offset, scale,
                 &lo, &hi)) {
        const int64_t raw_hot = raw_above(hot, offset, scale, lo, hi) - 1;
        int64_t k0 = 0;
        memset(work, 0, sizeof(int64_t) * 2 * (size_t)n_bins);
#ifdef LCLS_HAVE_SSE2
        const int level = simd_level();
        if (level >= 1 && dtype == LCLS_U16 && raw_hot >= 0 && !offset_d && !panel_t) {
            k0 = fast_chunks(chunk_start, n_chunks, n_pixels);
#ifdef LCLS_HAVE_AVX2
            if (level >= 2)
                pacc_avx2_u16((const uint16_t *)frame, k0, chunk_start, chunk_code, raw_hot,
                              work, excluded);
            else
#endif
            pacc_sse_u16((const uint16_t *)frame, k0, chunk_start, chunk_code, raw_hot,
                         work, excluded);
        }
#endif
#define DISPATCH(SUFFIX)                                                      \
    pchunk_##SUFFIX(frame, offset_d, chunk_panel, panel_t, k0, n_chunks, chunk_start, chunk_code, raw_hot, work, \
                    excluded)
        switch (dtype) {
        case LCLS_U8: DISPATCH(u8); break;
        case LCLS_I8: DISPATCH(i8); break;
        case LCLS_U16: DISPATCH(u16); break;
        default: DISPATCH(i16); break;
        }
#undef DISPATCH
        for (int32_t b = 0; b < n_bins; b++)
            sum[b] = ((double)work[2 * b] - (double)work[2 * b + 1] * offset) * scale;
        counts[0] = 0;
        return 0;
    }

    const int per_pixel = offset_px != NULL || scale_px != NULL || offset_d != NULL;
    memset(sum, 0, sizeof(double) * (size_t)n_bins);
#define DISPATCH(SUFFIX)                                                      \
    (per_pixel ? pacc_p_##SUFFIX : pacc_s_##SUFFIX)(                          \
        frame, n_chunks, chunk_start, chunk_code, offset_px, scale_px, offset_d, \
        offset, scale, hot, sum, excluded, counts)
    switch (dtype) {
    case LCLS_U8: DISPATCH(u8); break;
    case LCLS_I8: DISPATCH(i8); break;
    case LCLS_U16: DISPATCH(u16); break;
    case LCLS_I16: DISPATCH(i16); break;
    case LCLS_U32: DISPATCH(u32); break;
    case LCLS_I32: DISPATCH(i32); break;
    case LCLS_F32: DISPATCH(f32); break;
    default: DISPATCH(f64); break;
    }
#undef DISPATCH
    return 0;
}

/* ------------------------------------------------------------------ peaks */

/* Spans reaching their bin's threshold are taken in batches: their rows (and
 * the rows above and below) of frame, bins, visited and panel are prefetched
 * together, so that the cache misses of scattered peaks overlap. */
#define PEAK_BATCH 32
#if defined(__GNUC__)
#define PREFETCH_AT(base, size, i)                                             \
    __builtin_prefetch((const void *)((uintptr_t)(base) + (uintptr_t)((size) * (i))))
#else
#define PREFETCH_AT(base, size, i) ((void)0)
#endif
#define PREFETCH_ROWS(base, size, s, len, nx)                                  \
    do {                                                                       \
        for (int dr = -1; dr <= 1; dr++) {                                     \
            PREFETCH_AT(base, size, (int64_t)(s) + dr * (nx));                 \
            PREFETCH_AT(base, size, (int64_t)(s) + (len) - 1 + dr * (nx));     \
        }                                                                      \
    } while (0)

/* Photon value of pixel i in the flood fill with per-panel integer offsets
 * panel_t[pixel_panel[i]] (offset_px and offset_d NULL). */
#define CONV_PANEL(T, i)                                                      \
    (((double)((const T *)frame)[i] -                                        \
      (offset_px ? (double)offset_px[i]                                      \
       : offset_d ? offset + (double)offset_d[i]                             \
       : panel_t ? offset + (double)panel_t[pixel_panel[i]] : offset)) *     \
     (scale_px ? (double)scale_px[i] : scale))

/* Flood fill from the candidates, one specialisation per frame dtype. */
#define DEFINE_PEAKS(NAME, T, CONV_PEAK, HAS_PT)                              \
    static void NAME(const void *restrict frame, int64_t ny, int64_t nx,      \
                     const int32_t *restrict bins,                            \
                     const float *restrict offset_px,                         \
                     const float *restrict scale_px,                          \
                     const int16_t *restrict offset_d,                        \
                     const int32_t *restrict pixel_panel,                     \
                     const int16_t *restrict panel_t,                         \
                     double offset, double scale, double hot,                 \
                     const double *restrict thr, const double *restrict bg,   \
                     const int32_t *restrict panel, int connectivity,         \
                     int64_t min_pix, int64_t max_pix,                        \
                     const int32_t *restrict span_start,                      \
                     const int32_t *restrict span_len,                        \
                     const double *restrict span_max,                         \
                     const int32_t *restrict span_bin, int64_t n_spans,       \
                     uint8_t *restrict visited, int32_t *restrict stack,      \
                     double *out)                                             \
    {                                                                         \
        static const int dy8[8] = {-1, -1, -1, 0, 0, 1, 1, 1};                \
        static const int dx8[8] = {-1, 0, 1, -1, 1, -1, 0, 1};                \
        static const int dy4[4] = {-1, 0, 0, 1};                              \
        static const int dx4[4] = {0, -1, 1, 0};                              \
        (void)pixel_panel; (void)panel_t; /* (used with HAS_PT only) */       \
        const int nn = connectivity == 4 ? 4 : 8;                             \
        const int *dy = connectivity == 4 ? dy4 : dy8;                        \
        const int *dx = connectivity == 4 ? dx4 : dx8;                        \
        const int64_t block = ny * nx;                                        \
        int64_t top = 0, n_peaks = 0;                                         \
        double total = 0.0;                                                   \
        int32_t next[PEAK_BATCH];                                             \
        for (int64_t c0 = 0; c0 < n_spans;) {                                 \
          /* the next spans reaching their threshold; prefetch their rows */  \
          int n_next = 0;                                                     \
          for (; c0 < n_spans && n_next < PEAK_BATCH; c0++) {                 \
            const int32_t b0 = span_bin ? span_bin[c0] : bins[span_start[c0]]; \
            if (b0 < 0 || !(span_max[c0] > thr[b0])) continue;                \
            next[n_next++] = (int32_t)c0;                                     \
            PREFETCH_ROWS(frame, sizeof(T), span_start[c0], span_len[c0], nx); \
            PREFETCH_ROWS(bins, sizeof(int32_t), span_start[c0], span_len[c0], nx); \
            PREFETCH_ROWS(visited, 1, span_start[c0], span_len[c0], nx);      \
            if (panel)                                                        \
              PREFETCH_ROWS(panel, sizeof(int32_t), span_start[c0], span_len[c0], nx); \
            if (HAS_PT)                                                       \
              PREFETCH_ROWS(pixel_panel, sizeof(int32_t), span_start[c0],     \
                            span_len[c0], nx);                                \
          }                                                                   \
          for (int j = 0; j < n_next; j++) {                                  \
          const int64_t c = next[j];                                          \
          const int64_t s0 = span_start[c], s1 = s0 + span_len[c];            \
          for (int64_t seed = s0; seed < s1; seed++) {                        \
            const int32_t bs = bins[seed];                                    \
            if (bs < 0 || visited[seed]) continue;                            \
            const double vs = CONV_PEAK(T, seed);                            \
            if (!(vs > thr[bs] && vs <= hot)) continue;                       \
            const int64_t start = top;                                        \
            double isum = 0.0;                                                \
            visited[seed] = 1;                                                \
            stack[top++] = (int32_t)seed;                                     \
            for (int64_t head = start; head < top; head++) {                  \
                const int64_t p = stack[head];                                \
                isum += CONV_PEAK(T, p) - bg[bins[p]];                       \
                const int64_t base = (p / block) * block;                     \
                const int64_t y = (p - base) / nx, x = (p - base) % nx;       \
                for (int k = 0; k < nn; k++) {                                \
                    const int64_t yy = y + dy[k], xx = x + dx[k];             \
                    if (yy < 0 || yy >= ny || xx < 0 || xx >= nx) continue;   \
                    const int64_t q = base + yy * nx + xx;                    \
                    if (visited[q] || bins[q] < 0) continue;                  \
                    if (panel && panel[q] != panel[p]) continue;              \
                    const double vq = CONV_PEAK(T, q);                       \
                    if (!(vq <= hot && vq >= -DBL_MAX && vq > thr[bins[q]]))  \
                        continue;                                             \
                    visited[q] = 1;                                           \
                    stack[top++] = (int32_t)q;                                \
                }                                                             \
            }                                                                 \
            const int64_t size = top - start;                                 \
            if (size >= min_pix && size <= max_pix) {                         \
                n_peaks++;                                                    \
                total += isum;                                                \
            }                                                                 \
          }                                                                   \
          }                                                                   \
        }                                                                     \
        for (int64_t k = 0; k < top; k++) visited[stack[k]] = 0;              \
        out[0] = (double)n_peaks;                                             \
        out[1] = total;                                                       \
        out[2] = (double)top;                                                 \
    }

/* (with panel_t: CONV_PANEL; without: CONV_PIXEL, no per-pixel test of panel_t) */
#define DEFINE_PEAKS_SET(SUFFIX, T)                                           \
    DEFINE_PEAKS(peaks_##SUFFIX, T, CONV_PIXEL, 0)                            \
    DEFINE_PEAKS(peaks_t_##SUFFIX, T, CONV_PANEL, 1)

DEFINE_PEAKS_SET(u8, uint8_t)
DEFINE_PEAKS_SET(i8, int8_t)
DEFINE_PEAKS_SET(u16, uint16_t)
DEFINE_PEAKS_SET(i16, int16_t)
DEFINE_PEAKS_SET(u32, uint32_t)
DEFINE_PEAKS_SET(i32, int32_t)
DEFINE_PEAKS_SET(f32, float)
DEFINE_PEAKS_SET(f64, double)

int lcls_find_peaks(const void *frame, int dtype,
                    int64_t n_mod, int64_t ny, int64_t nx,
                    const int32_t *bins,
                    const float *offset_px, const float *scale_px,
                    const int16_t *offset_d,
                    const int32_t *pixel_panel, const int16_t *panel_t,
                    double offset, double scale, double hot,
                    const double *thr, const double *bg,
                    const int32_t *panel, int connectivity,
                    int64_t min_pix, int64_t max_pix,
                    const int32_t *span_start, const int32_t *span_len,
                    const double *span_max, const int32_t *span_bin,
                    int64_t n_spans, uint8_t *visited, int32_t *stack, double *out)
{
    (void)n_mod;
    if (panel_t && (offset_px || offset_d || !pixel_panel)) return -3;
    if (!(hot <= DBL_MAX)) hot = DBL_MAX;
#define DISPATCH(SUFFIX)                                                      \
    (panel_t ? peaks_t_##SUFFIX : peaks_##SUFFIX)(                            \
                   frame, ny, nx, bins, offset_px, scale_px, offset_d,        \
                   pixel_panel, panel_t, offset,                              \
                   scale,                                                     \
                   hot, thr, bg, panel, connectivity, min_pix, max_pix,       \
                   span_start, span_len, span_max, span_bin, n_spans,         \
                   visited, stack,                                            \
                   out)
    switch (dtype) {
    case LCLS_U8: DISPATCH(u8); break;
    case LCLS_I8: DISPATCH(i8); break;
    case LCLS_U16: DISPATCH(u16); break;
    case LCLS_I16: DISPATCH(i16); break;
    case LCLS_U32: DISPATCH(u32); break;
    case LCLS_I32: DISPATCH(i32); break;
    case LCLS_F32: DISPATCH(f32); break;
    case LCLS_F64: DISPATCH(f64); break;
    default: return -1;
    }
#undef DISPATCH
    return 0;
}

/* ------------------------------------------------------------ common mode */

/* Per-panel histograms of the photon values below `below`: bin 0 holds the
 * values under lo, bins 1..n_hist split [lo, below) evenly. Pixel i goes to
 * copy i % 4 of the histograms: most pixels of a panel fall in one bin, and
 * four copies make four independent chains of read-modify-write instead of
 * one (the copies are added in a fixed order afterwards). */
#define DEFINE_CM_HIST(NAME, T)                                               \
    static void NAME(const void *restrict frame, int64_t n_runs,              \
                     const int32_t *restrict run_start,                       \
                     const int32_t *restrict panel,                           \
                     const float *restrict offset_px,                         \
                     const float *restrict scale_px,                          \
                     const int16_t *restrict offset_d, double offset,         \
                     double scale, double below, double lo, int32_t n_hist,   \
                     int64_t n_panels, int64_t stride,                        \
                     int64_t *restrict count, double *restrict sum)           \
    {                                                                         \
        const double inv_h = (double)n_hist / (below - lo);                   \
        for (int64_t r = 0; r < n_runs; r++) {                                \
            const int64_t a = run_start[r], e = run_start[r + 1];             \
            const int32_t p = panel[a];                                       \
            if (p < 0) continue;                                              \
            int64_t i = a + (stride - a % stride) % stride;                   \
            for (int64_t t = i / stride; i < e; i += stride, t++) {           \
                const double v = CONV_PIXEL(T, i);                            \
                if (!(v < below) || !(v >= -DBL_MAX)) continue;               \
                int64_t k = 0;                                                \
                if (v >= lo) { /* (v - lo) * inv_h >= 0: truncation is floor */ \
                    k = (int64_t)((v - lo) * inv_h) + 1;                      \
                    if (k > n_hist) k = n_hist;                               \
                }                                                             \
                const int64_t j = ((t & 3) * n_panels + p) * (n_hist + 1) + k; \
                count[j]++;                                                   \
                sum[j] += v;                                                  \
            }                                                                 \
        }                                                                     \
    }

DEFINE_CM_HIST(cm_u8, uint8_t)
DEFINE_CM_HIST(cm_i8, int8_t)
DEFINE_CM_HIST(cm_u16, uint16_t)
DEFINE_CM_HIST(cm_i16, int16_t)
DEFINE_CM_HIST(cm_u32, uint32_t)
DEFINE_CM_HIST(cm_i32, int32_t)
DEFINE_CM_HIST(cm_f32, float)
DEFINE_CM_HIST(cm_f64, double)

/* Integer frames (scalar offset, optional integer offset_d, scale > 0): the
 * histogram of the sampled x = raw - offset_d per panel over the raw values
 * x_lo..x_hi of [lo, below) (slot 0: x < x_lo, summed exactly; slot w + 1:
 * x > x_hi, ignored), w + 2 slots a copy. The bins of the reference are
 * unions of whole slots (k(x) is monotonic in x), so the median bin and its
 * count are the same; its mean is v(x) for a bin of one raw value (exact,
 * the usual case: an ADU step wider than a bin), else sum(n_x v(x)) / n. */
#define DEFINE_CM_INT(NAME, T)                                                \
    static void NAME(const void *restrict frame, int64_t n_runs,              \
                     const int32_t *restrict run_start,                       \
                     const int32_t *restrict panel,                           \
                     const int16_t *restrict d, int64_t x_lo, int64_t w,      \
                     int64_t n_panels, int64_t stride, int64_t ncopy,         \
                     int64_t *restrict count, double *restrict usum)          \
    {                                                                         \
        const T *restrict f = (const T *)frame;                               \
        for (int64_t r = 0; r < n_runs; r++) {                                \
            const int64_t a = run_start[r], e = run_start[r + 1];             \
            const int32_t p = panel[a];                                       \
            if (p < 0) continue;                                              \
            int64_t i = a + (stride - a % stride) % stride;                   \
            /* integer counts: any copy will do; eight samples a step, on     \
             * ncopy (4 or 8) copies: independent read-modify-write chains */ \
            int64_t *const c0 = count + (size_t)p * (size_t)(w + 2);          \
            const int64_t cstep = n_panels * (w + 2), cm = ncopy - 1;         \
            for (; i + 7 * stride < e; i += 8 * stride) {                     \
                int64_t x[8], sl[8], under = 0;                               \
                /* (the hardware prefetcher alone leaves this loop waiting    \
                 * for the frame when it streams from memory) */              \
                PREFETCH_FRAME(f, i);                                         \
                if (d) PREFETCH_FRAME(d, i);                                  \
                for (int u = 0; u < 8; u++) {                                 \
                    const int64_t iu = i + u * stride;                        \
                    x[u] = (int64_t)f[iu] - (d ? (int64_t)d[iu] : 0);         \
                    const int64_t q = x[u] - x_lo + 1;                        \
                    sl[u] = q < 0 ? 0 : q > w + 1 ? w + 1 : q;                \
                    under |= sl[u] == 0;                                      \
                }                                                             \
                for (int u = 0; u < 8; u++) c0[(u & cm) * cstep + sl[u]]++;   \
                if (under)                                                    \
                    for (int u = 0; u < 8; u++)                               \
                        if (!sl[u]) usum[(u & 3) * n_panels + p] += (double)x[u]; \
            }                                                                 \
            for (; i < e; i += stride) {                                      \
                const int64_t x = (int64_t)f[i] - (d ? (int64_t)d[i] : 0);    \
                int64_t slot = x - x_lo + 1;                                  \
                slot = slot < 0 ? 0 : slot > w + 1 ? w + 1 : slot;            \
                c0[slot]++;                                                   \
                if (slot == 0) usum[p] += (double)x;                          \
            }                                                                 \
        }                                                                     \
    }

DEFINE_CM_INT(cmi_u8, uint8_t)
DEFINE_CM_INT(cmi_i8, int8_t)
DEFINE_CM_INT(cmi_u16, uint16_t)
DEFINE_CM_INT(cmi_i16, int16_t)

/* Medians by the integer histogram; 0 when it does not apply (the caller
 * then runs the float64 histogram). */
static int cm_int_medians(const void *frame, int dtype, const int32_t *panel,
                          int32_t n_panels, const int32_t *run_start,
                          int64_t n_runs, const int16_t *offset_d, double offset,
                          double scale, double below, double lo, int32_t n_hist,
                          int64_t stride, int64_t *hist_count, double *hist_sum,
                          double *median)
{
    int64_t rlo, rhi;
    if (!int_path(dtype, NULL, NULL, offset_d, offset, scale, &rlo, &rhi)) return 0;
    const int64_t x_lo = raw_above(nextafter(lo, -HUGE_VAL), offset, scale, rlo, rhi);
    const int64_t x_hi = raw_above(nextafter(below, -HUGE_VAL), offset, scale, rlo, rhi) - 1;
    const int64_t w = x_hi >= x_lo ? x_hi - x_lo + 1 : 0;
    if (w + 2 > (int64_t)n_hist + 1) return 0; /* finer than the bins: float path */
    const int64_t ncopy = 8 * (w + 2) <= 4 * ((int64_t)n_hist + 1) ? 8 : 4;
    const size_t n_cells = (size_t)n_panels * (size_t)(w + 2);
    memset(hist_count, 0, sizeof(int64_t) * (size_t)ncopy * n_cells);
    memset(hist_sum, 0, sizeof(double) * 4 * (size_t)n_panels);
#define DISPATCH(SUFFIX)                                                      \
    cmi_##SUFFIX(frame, n_runs, run_start, panel, offset_d, x_lo, w, n_panels, \
                 stride, ncopy, hist_count, hist_sum)
    switch (dtype) {
    case LCLS_U8: DISPATCH(u8); break;
    case LCLS_I8: DISPATCH(i8); break;
    case LCLS_U16: DISPATCH(u16); break;
    default: DISPATCH(i16); break;
    }
#undef DISPATCH
    const double inv_h = (double)n_hist / (below - lo);
#define KBIN(v) (!((v) >= lo) ? 0 : ((int64_t)(((v) - lo) * inv_h) + 1 > n_hist ? n_hist \
                 : (int64_t)(((v) - lo) * inv_h) + 1))
#define V(x) (((double)(x) - offset) * scale)
    for (int32_t p = 0; p < n_panels; p++) {
        int64_t *c = hist_count + (size_t)p * (size_t)(w + 2);
        for (int k = 1; k < ncopy; k++) {
            const int64_t *ck = hist_count + ((size_t)k * n_panels + p) * (size_t)(w + 2);
            for (int64_t j = 0; j <= w; j++) c[j] += ck[j];
        }
        const double us = (hist_sum[p] + hist_sum[n_panels + p]) +
                          (hist_sum[2 * n_panels + p] + hist_sum[3 * n_panels + p]);
        int64_t n = 0;
        for (int64_t j = 0; j <= w; j++) n += c[j];
        median[p] = 0.0;
        if (n == 0) continue;
        const int64_t rank = (n - 1) / 2;
        int64_t cum = 0, j = 0;
        for (; j <= w; j++) {
            cum += c[j];
            if (cum > rank) break;
        }
        if (j == 0) { /* under the histogram: the mean of those values */
            median[p] = (us - (double)c[0] * offset) * scale / (double)c[0];
            continue;
        }
        const int64_t kb = KBIN(V(x_lo + j - 1));
        int64_t j0 = j, j1 = j;
        while (j0 > 1 && KBIN(V(x_lo + j0 - 2)) == kb) j0--;
        while (j1 < w && KBIN(V(x_lo + j1)) == kb) j1++;
        if (kb == 0) { /* slots of bin 0 (v < lo cannot be in the window: defensive) */
            median[p] = V(x_lo + j - 1);
            continue;
        }
        int64_t nb = 0, distinct = 0, jd = j;
        double sb = 0.0;
        for (int64_t jj = j0; jj <= j1; jj++)
            if (c[jj]) {
                nb += c[jj]; sb += (double)c[jj] * V(x_lo + jj - 1);
                distinct++; jd = jj;
            }
        median[p] = distinct == 1 ? V(x_lo + jd - 1) : sb / (double)nb;
    }
#undef KBIN
#undef V
    return 1;
}

int lcls_panel_common_mode(const void *frame, int dtype, int64_t n_pixels,
                           const int32_t *panel, int32_t n_panels,
                           const int32_t *run_start, int64_t n_runs,
                           const float *offset_px, const float *scale_px,
                           const int16_t *offset_d, double offset, double scale,
                           double below, double lo, int32_t n_hist, int64_t stride,
                           int64_t *hist_count, double *hist_sum, double *median,
                           float *offset_out, int16_t *offset_d_out, double d_base)
{
    (void)n_pixels;
    const size_t n_cells = (size_t)n_panels * (size_t)(n_hist + 1);
    if (!(lo < below) || n_hist < 1 || stride < 1) return -2;
    if (dtype < LCLS_U8 || dtype > LCLS_F64) return -1;
    if (!offset_px && !scale_px &&
        cm_int_medians(frame, dtype, panel, n_panels, run_start, n_runs, offset_d, offset,
                       scale, below, lo, n_hist, stride, hist_count, hist_sum, median))
        goto offsets;
    memset(hist_count, 0, sizeof(int64_t) * 4 * n_cells);
    memset(hist_sum, 0, sizeof(double) * 4 * n_cells);
#define DISPATCH(SUFFIX)                                                      \
    cm_##SUFFIX(frame, n_runs, run_start, panel, offset_px, scale_px, offset_d, offset, \
                scale, below, lo, n_hist, n_panels, stride, hist_count, hist_sum)
    switch (dtype) {
    case LCLS_U8: DISPATCH(u8); break;
    case LCLS_I8: DISPATCH(i8); break;
    case LCLS_U16: DISPATCH(u16); break;
    case LCLS_I16: DISPATCH(i16); break;
    case LCLS_U32: DISPATCH(u32); break;
    case LCLS_I32: DISPATCH(i32); break;
    case LCLS_F32: DISPATCH(f32); break;
    case LCLS_F64: DISPATCH(f64); break;
    default: return -1;
    }
#undef DISPATCH
    for (size_t j = 0; j < n_cells; j++) { /* copy 0 <- the four copies */
        hist_count[j] += hist_count[n_cells + j] + hist_count[2 * n_cells + j] +
                         hist_count[3 * n_cells + j];
        hist_sum[j] = (hist_sum[j] + hist_sum[n_cells + j]) +
                      (hist_sum[2 * n_cells + j] + hist_sum[3 * n_cells + j]);
    }
    for (int32_t p = 0; p < n_panels; p++) {
        const int64_t *c = hist_count + (size_t)p * (size_t)(n_hist + 1);
        const double *s = hist_sum + (size_t)p * (size_t)(n_hist + 1);
        int64_t n = 0;
        for (int32_t k = 0; k <= n_hist; k++) n += c[k];
        median[p] = 0.0;
        if (n == 0) continue;
        const int64_t rank = (n - 1) / 2; /* the lower median */
        int64_t cum = 0;
        for (int32_t k = 0; k <= n_hist; k++) {
            cum += c[k];
            if (cum > rank) {
                median[p] = s[k] / (double)c[k];
                break;
            }
        }
    }
offsets:;
    const int per_pixel = offset_px || scale_px || offset_d;
#define BASE(i)                                                               \
    (offset_px ? (double)offset_px[i] : offset_d ? offset + (double)offset_d[i] : offset)
#define SCALE(i) (scale_px ? (double)scale_px[i] : scale)
#define PIXEL_OFF(i, p)                                                       \
    ((float)((p) >= 0 && SCALE(i) > 0 ? BASE(i) + median[p] / SCALE(i) : BASE(i)))
    if (offset_d_out) { /* integer deltas from d_base, when every offset is one */
        int ok = 1;
        if (!per_pixel) {
            /* one value per panel (and one for the pixels of no panel), in the
             * second copy of hist_count once the copies are added up */
            int64_t *const table = hist_count + n_cells;
            for (int32_t p = -1; p < n_panels && ok; p++) {
                const double of = (double)PIXEL_OFF(0, p), o = of - d_base;
                ok = of == floor(of) && o >= -32768.0 && o <= 32767.0;
                table[p + 1] = ok ? (int64_t)o : 0;
            }
            if (ok) {
                for (int64_t r = 0; r < n_runs; r++) {
                    /* bounds in locals: the stores may not alias them */
                    const int64_t a = run_start[r], e = run_start[r + 1];
                    const int16_t o = (int16_t)table[panel[a] + 1];
                    int16_t *restrict out = offset_d_out;
                    for (int64_t i = a; i < e; i++) out[i] = o;
                }
                return 0;
            }
        } else {
            for (int64_t r = 0; r < n_runs && ok; r++) {
                const int32_t p = panel[run_start[r]];
                for (int64_t i = run_start[r]; i < run_start[r + 1] && ok; i++) {
                    const double of = (double)PIXEL_OFF(i, p), o = of - d_base;
                    ok = of == floor(of) && o >= -32768.0 && o <= 32767.0;
                    offset_d_out[i] = ok ? (int16_t)o : 0;
                }
            }
            if (ok) return 0;
        }
    }
    if (offset_out)
        for (int64_t r = 0; r < n_runs; r++) {
            const int32_t p = panel[run_start[r]];
            for (int64_t i = run_start[r]; i < run_start[r + 1]; i++)
                offset_out[i] = PIXEL_OFF(i, p);
        }
#undef BASE
#undef SCALE
#undef PIXEL_OFF
    return offset_d_out ? 1 : 0;
}
