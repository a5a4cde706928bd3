/* lcls-dl C kernels: fused per-frame accumulation and peak finding.
 * See lcls_kernels.h for the contracts and lcls_dl/ingest/kernels.py for the
 * numpy reference implementation that defines the semantics.
 */
#include "lcls_kernels.h"

#include <float.h>
#include <math.h>
#include <string.h>
#if defined(__SSE2__) && defined(__x86_64__)
#include <emmintrin.h>
#define LCLS_HAVE_SSE2 1
#endif

int lcls_abi_version(void) { return LCLS_KERNELS_ABI; }

#define CONV_SCALAR(T, i) (((double)((const T *)frame)[i] - offset) * scale)
#define CONV_PIXEL(T, i)                                                      \
    (((double)((const T *)frame)[i] -                                        \
      (offset_px ? (double)offset_px[i] : offset)) *                         \
     (scale_px ? (double)scale_px[i] : scale))

/* Candidate spans: pixel ranges within one bin holding at least one pixel
 * above cand_thr, with their largest (non-excluded) photon value. */
struct lcls_spans {
    int32_t *start, *len;
    double *max;
};

#define EMIT_SPAN(S, L, M)                                                    \
    do {                                                                      \
        sp->start[ns] = (int32_t)(S);                                         \
        sp->len[ns] = (int32_t)(L);                                           \
        sp->max[ns] = (M);                                                    \
        ns++;                                                                 \
    } while (0)

/* Largest included value per bin (the polar image's max-SNR channel). */
#define BMAX(B, M) do { if ((M) > bmax[B]) bmax[B] = (M); } while (0)

/* One run of pixels [s, s + len) sharing bin b. Fast path: sums, squares and
 * max with two independent chains; a run holding a hot or non-finite pixel is
 * redone pixel by pixel (exclusions); a run whose max exceeds cand_thr is a
 * candidate span. */
#define DEFINE_ACC(NAME, CONV, T)                                             \
    static void NAME(const void *restrict frame, int64_t n_runs,              \
                     const int32_t *restrict run_start,                       \
                     const int32_t *restrict run_len,                         \
                     const int32_t *restrict run_bin,                         \
                     const float *restrict offset_px,                         \
                     const float *restrict scale_px,                          \
                     double offset, double scale, double hot,                 \
                     double cand_thr, double *restrict sum,                   \
                     double *restrict sumsq, int32_t *restrict excluded,      \
                     double *restrict bmax,                                   \
                     struct lcls_spans *sp, int64_t *counts, double *vmax)   \
    {                                                                         \
        (void)offset_px; (void)scale_px;                                      \
        double vm = -HUGE_VAL;                                                \
        int64_t ns = 0, nl = 0, nnf = 0;                                              \
        for (int64_t r = 0; r < n_runs; r++) {                                \
            const int64_t s = run_start[r], e = s + run_len[r];               \
            const int32_t b = run_bin[r];                                     \
            double a0 = 0.0, a1 = 0.0, q0 = 0.0, q1 = 0.0;                    \
            double m0 = -HUGE_VAL, m1 = -HUGE_VAL;                            \
            int64_t i = s;                                                    \
            for (; i + 2 <= e; i += 2) {                                      \
                const double v0 = CONV(T, i), v1 = CONV(T, i + 1);            \
                a0 += v0; a1 += v1;                                           \
                q0 += v0 * v0; q1 += v1 * v1;                                 \
                m0 = v0 > m0 ? v0 : m0; m1 = v1 > m1 ? v1 : m1;               \
            }                                                                 \
            if (i < e) {                                                      \
                const double v0 = CONV(T, i);                                 \
                a0 += v0; q0 += v0 * v0; m0 = v0 > m0 ? v0 : m0;              \
            }                                                                 \
            const double m = m0 > m1 ? m0 : m1;                               \
            const double a = a0 + a1, q = q0 + q1;                            \
            if (!(m <= hot) || !isfinite(a) || !isfinite(q)) {                \
                double ps = 0.0, pq = 0.0, pm = -HUGE_VAL;                    \
                for (i = s; i < e; i++) {                                     \
                    const double v = CONV(T, i);                              \
                    if (v <= hot && v >= -DBL_MAX) {                          \
                        ps += v; pq += v * v; pm = v > pm ? v : pm;           \
                        nl += (v > cand_thr);                                 \
                    } else {                                                  \
                        excluded[b]++;                                        \
                        nnf += !isfinite(v);                                  \
                    }                                                         \
                }                                                             \
                sum[b] += ps; sumsq[b] += pq; vm = pm > vm ? pm : vm; BMAX(b, pm);         \
                if (pm > cand_thr) EMIT_SPAN(s, e - s, pm);         \
                continue;                                                     \
            }                                                                 \
            if (m > cand_thr) {                                               \
                for (i = s; i < e; i++) {                                     \
                    nl += (CONV(T, i) > cand_thr);                            \
                }                                                             \
                EMIT_SPAN(s, e - s, m);                                       \
            }                                                                 \
            sum[b] += a; sumsq[b] += q;                                       \
            vm = m > vm ? m : vm; BMAX(b, m);                                 \
        }                                                                     \
        *vmax = vm;                                                           \
        counts[0] = ns; counts[1] = nl; counts[2] = nnf;                      \
    }

/* Small integer frames with a scalar offset and scale > 0: sum the raw values
 * and their squares exactly in int64 per run (vectorisable, no conversion per
 * pixel) and convert once per run. The max raw value gives the run's max
 * photon value exactly, so the hot check and candidate test are unchanged. */
#define DEFINE_ACC_INT(NAME, T)                                               \
    static void NAME(const void *restrict frame, int64_t n_runs,              \
                     const int32_t *restrict run_start,                       \
                     const int32_t *restrict run_len,                         \
                     const int32_t *restrict run_bin,                         \
                     double offset, double scale, double hot,                 \
                     double cand_thr, double *restrict sum,                   \
                     double *restrict sumsq, int32_t *restrict excluded,      \
                     double *restrict bmax,                                   \
                     struct lcls_spans *sp, int64_t *counts, double *vmax)   \
    {                                                                         \
        const T *restrict f = (const T *)frame;                               \
        double vm = -HUGE_VAL;                                                \
        int64_t ns = 0, nl = 0;                                                       \
        for (int64_t r = 0; r < n_runs; r++) {                                \
            const int64_t s = run_start[r], len = run_len[r], e = s + len;    \
            const int32_t b = run_bin[r];                                     \
            int64_t a = 0, q = 0;                                             \
            int32_t m = f[s];                                                 \
            for (int64_t i = s; i < e; i++) {                                 \
                const int32_t x = f[i];                                       \
                a += x;                                                       \
                q += (int64_t)(x * x);                                        \
                m = x > m ? x : m;                                            \
            }                                                                 \
            const double v_m = ((double)m - offset) * scale;                  \
            if (!(v_m <= hot)) {                                              \
                double ps = 0.0, pq = 0.0, pm = -HUGE_VAL;                    \
                for (int64_t i = s; i < e; i++) {                             \
                    const double v = ((double)f[i] - offset) * scale;         \
                    if (v <= hot) {                                           \
                        ps += v; pq += v * v; pm = v > pm ? v : pm;           \
                        nl += (v > cand_thr);                                 \
                    } else {                                                  \
                        excluded[b]++;                                        \
                    }                                                         \
                }                                                             \
                sum[b] += ps; sumsq[b] += pq; vm = pm > vm ? pm : vm; BMAX(b, pm);         \
                if (pm > cand_thr) EMIT_SPAN(s, e - s, pm);         \
                continue;                                                     \
            }                                                                 \
            if (v_m > cand_thr) {                                             \
                for (int64_t i = s; i < e; i++) {                             \
                    nl += (((double)f[i] - offset) * scale > cand_thr);       \
                }                                                             \
                EMIT_SPAN(s, len, v_m);                                       \
            }                                                                 \
            const double da = (double)a, dl = (double)len;                    \
            sum[b] += (da - dl * offset) * scale;                             \
            sumsq[b] += (((double)q - 2.0 * offset * da) + dl * offset * offset) \
                        * (scale * scale);                                    \
            vm = v_m > vm ? v_m : vm; BMAX(b, v_m);                           \
        }                                                                     \
        *vmax = vm;                                                           \
        counts[0] = ns; counts[1] = nl; counts[2] = 0;                        \
    }

DEFINE_ACC_INT(acc_int_u8, uint8_t)
DEFINE_ACC_INT(acc_int_i8, int8_t)
DEFINE_ACC_INT(acc_int_u16, uint16_t)
DEFINE_ACC_INT(acc_int_i16, int16_t)

#ifdef LCLS_HAVE_SSE2
/* uint16 frames (the common case), scalar offset and scale > 0: each run is
 * taken in chunks of up to 16 pixels with two 128-bit loads and a lane mask;
 * sums, sums of squares (exact, int64) and the max come from SSE2 reductions,
 * so a chunk costs no data-dependent branch. Values are biased by -32768 to
 * use the signed 16-bit instructions; the bias is removed exactly. */
/* portable popcount (no -mpopcnt in the build flags: avoid the libgcc call) */
static inline int popcount32(uint32_t x)
{
    x = x - ((x >> 1) & 0x55555555u);
    x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
    x = (x + (x >> 4)) & 0x0F0F0F0Fu;
    return (int)((x * 0x01010101u) >> 24);
}

static const uint16_t lane_mask_src[32] = {
    0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF,
    0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};

static void acc_sse_u16(const void *restrict frame, int64_t n_pixels,
                        int64_t n_runs, const int32_t *restrict run_start,
                        const int32_t *restrict run_len,
                        const int32_t *restrict run_bin, double offset,
                        double scale, double hot, double cand_thr,
                        double *restrict sum, double *restrict sumsq,
                        int32_t *restrict excluded, double *restrict bmax,
                        struct lcls_spans *sp,
                        int64_t *counts, double *vmax)
{
    const uint16_t *restrict f = (const uint16_t *)frame;
    const __m128i bias = _mm_set1_epi16((short)0x8000);
    const __m128i ones = _mm_set1_epi16(1);
    const __m128i zero = _mm_setzero_si128();
    const double scale2 = scale * scale, off2 = offset * offset;
    /* smallest raw value whose photon value exceeds cand_thr (monotonic in raw) */
    int32_t raw_cand = 65536;
    if (cand_thr < HUGE_VAL) {
        double guess = floor(cand_thr / scale + offset) - 2.0;
        int32_t g = guess < 0.0 ? 0 : guess > 65536.0 ? 65536 : (int32_t)guess;
        while (g > 0 && ((double)(g - 1) - offset) * scale > cand_thr) g--;
        while (g < 65536 && !(((double)g - offset) * scale > cand_thr)) g++;
        raw_cand = g;
    }
    /* biased compare value: lane > cmp  <=>  raw >= raw_cand (raw_cand >= 1) */
    const __m128i cand_cmp = _mm_set1_epi16((short)((raw_cand - 1 - 32768) & 0xFFFF));
    double vm = -HUGE_VAL;
    int64_t ns = 0, nl = 0;
    for (int64_t r = 0; r < n_runs; r++) {
        const int64_t e = (int64_t)run_start[r] + run_len[r];
        const int32_t b = run_bin[r];
        for (int64_t s = run_start[r]; s < e; s += 16) {
            const int64_t len = e - s < 16 ? e - s : 16;
            int64_t a, q;
            int32_t m;
            uint32_t lanes = 0; /* 2 bits per candidate pixel, when known */
            if (s + 16 <= n_pixels) {
                const __m128i mlo = _mm_loadu_si128((const __m128i *)(lane_mask_src + 16 - len));
                const __m128i mhi = _mm_loadu_si128((const __m128i *)(lane_mask_src + 24 - len));
                __m128i lo = _mm_and_si128(_mm_loadu_si128((const __m128i *)(f + s)), mlo);
                __m128i hi = _mm_and_si128(_mm_loadu_si128((const __m128i *)(f + s + 8)), mhi);
                lo = _mm_xor_si128(lo, bias); /* raw - 32768, masked lanes -32768 */
                hi = _mm_xor_si128(hi, bias);
                __m128i mx = _mm_max_epi16(lo, hi);
                mx = _mm_max_epi16(mx, _mm_srli_si128(mx, 8));
                mx = _mm_max_epi16(mx, _mm_srli_si128(mx, 4));
                mx = _mm_max_epi16(mx, _mm_srli_si128(mx, 2));
                m = (int32_t)(int16_t)_mm_cvtsi128_si32(mx) + 32768;
                __m128i s32 = _mm_add_epi32(_mm_madd_epi16(lo, ones), _mm_madd_epi16(hi, ones));
                s32 = _mm_add_epi32(s32, _mm_srli_si128(s32, 8));
                s32 = _mm_add_epi32(s32, _mm_srli_si128(s32, 4));
                const int64_t sb = _mm_cvtsi128_si32(s32); /* sum of biased values */
                /* pair sums of squares are <= 2^31: unsigned 32-bit, widen to 64 */
                const __m128i q1 = _mm_madd_epi16(lo, lo), q2 = _mm_madd_epi16(hi, hi);
                __m128i q64 = _mm_add_epi64(
                    _mm_add_epi64(_mm_unpacklo_epi32(q1, zero), _mm_unpackhi_epi32(q1, zero)),
                    _mm_add_epi64(_mm_unpacklo_epi32(q2, zero), _mm_unpackhi_epi32(q2, zero)));
                q64 = _mm_add_epi64(q64, _mm_srli_si128(q64, 8));
                const int64_t qb = (int64_t)_mm_cvtsi128_si64(q64);
                a = sb + 16 * 32768;                       /* masked lanes add 0 */
                q = qb + 65536 * sb + 16 * ((int64_t)1 << 30);
                if (raw_cand >= 1 && m >= raw_cand) {
                    lanes = (uint32_t)_mm_movemask_epi8(_mm_and_si128(_mm_cmpgt_epi16(lo, cand_cmp), mlo)) |
                            ((uint32_t)_mm_movemask_epi8(_mm_and_si128(_mm_cmpgt_epi16(hi, cand_cmp), mhi)) << 16);
                }
            } else { /* last pixels of the frame: no reads past its end */
                a = 0; q = 0; m = 0;
                for (int64_t i = s; i < s + len; i++) {
                    const int32_t x = f[i];
                    a += x; q += (int64_t)x * x; m = x > m ? x : m;
                }
            }
            const double v_m = ((double)m - offset) * scale;
            if (!(v_m <= hot)) {
                double ps = 0.0, pq = 0.0, pm = -HUGE_VAL;
                for (int64_t i = s; i < s + len; i++) {
                    const double v = ((double)f[i] - offset) * scale;
                    if (v <= hot) {
                        ps += v; pq += v * v; pm = v > pm ? v : pm;
                        nl += (v > cand_thr);
                    } else {
                        excluded[b]++;
                    }
                }
                sum[b] += ps; sumsq[b] += pq; vm = pm > vm ? pm : vm; BMAX(b, pm);
                if (pm > cand_thr) EMIT_SPAN(s, len, pm);
                continue;
            }
            if (lanes) {
                nl += popcount32(lanes) >> 1;
                EMIT_SPAN(s, len, v_m);
            } else if (v_m > cand_thr) {
                for (int64_t i = s; i < s + len; i++) {
                    nl += (((double)f[i] - offset) * scale > cand_thr);
                }
                EMIT_SPAN(s, len, v_m);
            }
            const double da = (double)a, dl = (double)len;
            sum[b] += (da - dl * offset) * scale;
            sumsq[b] += (((double)q - 2.0 * offset * da) + dl * off2) * scale2;
            vm = v_m > vm ? v_m : vm; BMAX(b, v_m);
        }
    }
    *vmax = vm;
    counts[0] = ns; counts[1] = nl; counts[2] = 0;
}
#endif

#define DEFINE_ACC_PAIR(SUFFIX, T)                                            \
    DEFINE_ACC(acc_s_##SUFFIX, CONV_SCALAR, T)                                \
    DEFINE_ACC(acc_p_##SUFFIX, CONV_PIXEL, T)

DEFINE_ACC_PAIR(u8, uint8_t)
DEFINE_ACC_PAIR(i8, int8_t)
DEFINE_ACC_PAIR(u16, uint16_t)
DEFINE_ACC_PAIR(i16, int16_t)
DEFINE_ACC_PAIR(u32, uint32_t)
DEFINE_ACC_PAIR(i32, int32_t)
DEFINE_ACC_PAIR(f32, float)
DEFINE_ACC_PAIR(f64, double)

int lcls_accumulate(const void *frame, int dtype, int64_t n_pixels,
                    int64_t n_runs,
                    const int32_t *run_start, const int32_t *run_len,
                    const int32_t *run_bin, int32_t n_bins,
                    const float *offset_px, const float *scale_px,
                    double offset, double scale, double hot, double cand_thr,
                    double *sum, double *sumsq, int32_t *excluded, double *bmax,
                    int32_t *span_start, int32_t *span_len, double *span_max,
                    int64_t *counts, double *vmax)
{
    struct lcls_spans spans = {span_start, span_len, span_max};
    struct lcls_spans *sp = &spans;
    const int per_pixel = offset_px != NULL || scale_px != NULL;
    if (!(hot <= DBL_MAX)) hot = DBL_MAX; /* +inf pixels are never "not hot" */
    memset(sum, 0, sizeof(double) * (size_t)n_bins);
    memset(sumsq, 0, sizeof(double) * (size_t)n_bins);
    memset(excluded, 0, sizeof(int32_t) * (size_t)n_bins);
    for (int32_t k = 0; k < n_bins; k++) bmax[k] = -HUGE_VAL;

    if (!per_pixel && scale > 0 && dtype >= LCLS_U8 && dtype <= LCLS_I16) {
#ifdef LCLS_HAVE_SSE2
        if (dtype == LCLS_U16) {
            acc_sse_u16(frame, n_pixels, n_runs, run_start, run_len, run_bin,
                        offset, scale, hot, cand_thr, sum, sumsq, excluded,
                        bmax, sp, counts, vmax);
            return 0;
        }
#else
        (void)n_pixels;
#endif
#define DISPATCH(SUFFIX)                                                      \
    acc_int_##SUFFIX(frame, n_runs, run_start, run_len, run_bin, offset,      \
                     scale, hot, cand_thr, sum, sumsq, excluded, bmax, sp,    \
                     counts,                                                  \
                     vmax)
        switch (dtype) {
        case LCLS_U8: DISPATCH(u8); break;
        case LCLS_I8: DISPATCH(i8); break;
        case LCLS_U16: DISPATCH(u16); break;
        default: DISPATCH(i16); break;
        }
#undef DISPATCH
        return 0;
    }
#define DISPATCH(SUFFIX)                                                      \
    (per_pixel ? acc_p_##SUFFIX : acc_s_##SUFFIX)(                            \
        frame, n_runs, run_start, run_len, run_bin, offset_px, scale_px,      \
        offset, scale, hot, cand_thr, sum, sumsq, excluded, bmax, sp, counts, \
        vmax)
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

/* ------------------------------------------------------------------ peaks */

/* Flood fill from the candidates, one specialisation per frame dtype. */
#define DEFINE_PEAKS(NAME, T)                                                 \
    static void NAME(const void *restrict frame, int64_t ny, int64_t nx,      \
                     const int32_t *restrict bins,                            \
                     const float *restrict offset_px,                         \
                     const float *restrict scale_px,                          \
                     double offset, double scale, double hot,                 \
                     const double *restrict thr, const double *restrict bg,   \
                     const int32_t *restrict panel, int connectivity,         \
                     int64_t min_pix, int64_t max_pix,                        \
                     const int32_t *restrict span_start,                      \
                     const int32_t *restrict span_len,                        \
                     const double *restrict span_max, int64_t n_spans,        \
                     uint8_t *restrict visited, int32_t *restrict stack,      \
                     double *out)                                             \
    {                                                                         \
        static const int dy8[8] = {-1, -1, -1, 0, 0, 1, 1, 1};                \
        static const int dx8[8] = {-1, 0, 1, -1, 1, -1, 0, 1};                \
        static const int dy4[4] = {-1, 0, 0, 1};                              \
        static const int dx4[4] = {0, -1, 1, 0};                              \
        const int nn = connectivity == 4 ? 4 : 8;                             \
        const int *dy = connectivity == 4 ? dy4 : dy8;                        \
        const int *dx = connectivity == 4 ? dx4 : dx8;                        \
        const int64_t block = ny * nx;                                        \
        int64_t top = 0, n_peaks = 0;                                         \
        double total = 0.0;                                                   \
        for (int64_t c = 0; c < n_spans; c++) {                               \
          const int64_t s0 = span_start[c], s1 = s0 + span_len[c];            \
          if (bins[s0] < 0 || !(span_max[c] > thr[bins[s0]])) continue;       \
          for (int64_t seed = s0; seed < s1; seed++) {                        \
            const int32_t bs = bins[seed];                                    \
            if (bs < 0 || visited[seed]) continue;                            \
            const double vs = CONV_PIXEL(T, seed);                            \
            if (!(vs > thr[bs] && vs <= hot)) continue;                       \
            const int64_t start = top;                                        \
            double isum = 0.0;                                                \
            visited[seed] = 1;                                                \
            stack[top++] = (int32_t)seed;                                     \
            for (int64_t head = start; head < top; head++) {                  \
                const int64_t p = stack[head];                                \
                isum += CONV_PIXEL(T, p) - bg[bins[p]];                       \
                const int64_t base = (p / block) * block;                     \
                const int64_t y = (p - base) / nx, x = (p - base) % nx;       \
                for (int k = 0; k < nn; k++) {                                \
                    const int64_t yy = y + dy[k], xx = x + dx[k];             \
                    if (yy < 0 || yy >= ny || xx < 0 || xx >= nx) continue;   \
                    const int64_t q = base + yy * nx + xx;                    \
                    if (visited[q] || bins[q] < 0) continue;                  \
                    if (panel && panel[q] != panel[p]) continue;              \
                    const double vq = CONV_PIXEL(T, q);                       \
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
        }                                                                     \
        for (int64_t k = 0; k < top; k++) visited[stack[k]] = 0;              \
        out[0] = (double)n_peaks;                                             \
        out[1] = total;                                                       \
        out[2] = (double)top;                                                 \
    }

DEFINE_PEAKS(peaks_u8, uint8_t)
DEFINE_PEAKS(peaks_i8, int8_t)
DEFINE_PEAKS(peaks_u16, uint16_t)
DEFINE_PEAKS(peaks_i16, int16_t)
DEFINE_PEAKS(peaks_u32, uint32_t)
DEFINE_PEAKS(peaks_i32, int32_t)
DEFINE_PEAKS(peaks_f32, float)
DEFINE_PEAKS(peaks_f64, double)

int lcls_find_peaks(const void *frame, int dtype,
                    int64_t n_mod, int64_t ny, int64_t nx,
                    const int32_t *bins,
                    const float *offset_px, const float *scale_px,
                    double offset, double scale, double hot,
                    const double *thr, const double *bg,
                    const int32_t *panel, int connectivity,
                    int64_t min_pix, int64_t max_pix,
                    const int32_t *span_start, const int32_t *span_len,
                    const double *span_max, int64_t n_spans,
                    uint8_t *visited, int32_t *stack, double *out)
{
    (void)n_mod;
    if (!(hot <= DBL_MAX)) hot = DBL_MAX;
#define DISPATCH(SUFFIX)                                                      \
    peaks_##SUFFIX(frame, ny, nx, bins, offset_px, scale_px, offset, scale,   \
                   hot, thr, bg, panel, connectivity, min_pix, max_pix,       \
                   span_start, span_len, span_max, n_spans, visited, stack,   \
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
