/* lcls-dl C kernels: fused per-frame accumulation, radial-profile pass,
 * per-panel common mode and peak finding.
 *
 * Plain C functions, loaded from Python with ctypes (lcls_dl/ingest/kernels.py).
 * The numpy reference implementation in that module defines the semantics;
 * tests/test_kernels.py checks that both agree.
 */
#ifndef LCLS_KERNELS_H
#define LCLS_KERNELS_H

#include <stdint.h>

/* dtype codes of the raw frame */
enum {
    LCLS_U8 = 0, LCLS_I8 = 1, LCLS_U16 = 2, LCLS_I16 = 3,
    LCLS_U32 = 4, LCLS_I32 = 5, LCLS_F32 = 6, LCLS_F64 = 7
};

/* Version of the kernel ABI; the loader refuses a library with another one. */
#define LCLS_KERNELS_ABI 8
int lcls_abi_version(void);

/* Bin table of both accumulation kernels: chunks of at most 16 consecutive
 * pixels sharing a bin, in ascending pixel order (masked / out-of-range
 * pixels belong to no chunk). Chunk k covers pixels
 * [chunk_start[k], chunk_start[k] + len) of bin b, with
 * chunk_code[k] = b << 4 | (len - 1) (so b < 2^28). Packed, the table costs
 * 8 bytes per chunk and a chunk is one fixed-size step of the kernels: no
 * data-dependent loop count per run of pixels.
 *
 * The photon value of pixel i is
 *     v = ((double)frame[i] - off_i) * scale_i
 * with off_i = offset_px[i] when offset_px is not NULL, else
 * offset + offset_d[i] when offset_d (integer ADU offsets, e.g. an integral
 * dark frame, stored as deltas from the scalar offset) is not NULL, else
 * offset; scale_i = scale_px ? scale_px[i] : scale. Pixels
 * with v > hot or v non-finite are excluded: excluded[bin]++ (non-finite
 * ones also counted as "non-finite"). Integer frames of at most 16 bits with
 * a scalar offset (with or without offset_d) and scale > 0 are summed exactly
 * in 64-bit integers per bin, on frame[i] - offset_d[i] (the thresholds
 * become raw-value thresholds, the same comparisons), and converted once per
 * bin; with offset_d, half the memory traffic of a float32 offset_px.
 * n_pixels is the frame size (no read goes past it).
 * Per-panel integer offsets (per-panel common mode): when panel_t is not
 * NULL, off_i = offset + panel_t[chunk_panel[k]] for the pixels of chunk k
 * (chunks never straddle panels: one table look-up per chunk, no per-pixel
 * offset array); this needs the integer path above with offset_d and
 * offset_px NULL (else -3 is returned).
 * Both return 0, -1 for an unknown dtype, -3 for a misused panel_t. */

/* Fused pass: every included pixel adds v to sum[bin] and v*v to sumsq[bin]
 * and updates bmax[bin] (largest included value of the bin, -HUGE_VAL when
 * none) and *vmax (the largest of all). Pixels with v > cand_thr ("lit",
 * counted in counts[1]) are reported as candidate spans: ascending,
 * non-overlapping ranges [span_start[k], span_start[k] + span_len[k]) inside
 * one chunk that contain every lit pixel, with span_max[k] the largest
 * included value of the span and span_bin[k] its bin; counts[0] = number of
 * spans (capacity:
 * n_chunks + 1), counts[2] = non-finite pixels. sum, sumsq, excluded, bmax
 * (n_bins each) are overwritten; work holds 4 * n_bins int64 of scratch. */
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
                    int32_t *span_bin, int64_t *counts, double *vmax);

/* Radial-profile pass: only sum[bin] (sum of included v), excluded[bin] and
 * counts[0] = non-finite pixels; no squares, maxima or candidates. sum and
 * excluded (n_bins each) are overwritten; work holds 2 * n_bins int64. */
int lcls_profile_accumulate(const void *frame, int dtype, int64_t n_pixels,
                            int64_t n_chunks, const int32_t *chunk_start,
                            const uint32_t *chunk_code, int32_t n_bins,
                            const float *offset_px, const float *scale_px,
                            const int16_t *offset_d,
                            const int32_t *chunk_panel, const int16_t *panel_t,
                            double offset, double scale, double hot,
                            double *sum, int32_t *excluded, int64_t *work,
                            int64_t *counts);

/* SIMD level of the uint16 accumulation paths: 0 scalar, 1 SSE2, 2 AVX2
 * (chosen at run time). max_level >= 0 caps it for this process (tests use
 * it to run every path on one machine); returns the level now in use. */
int lcls_simd_level(int max_level);

/* Connected components of peak pixels, grown from the candidate spans.
 *
 * The frame is viewed as n_mod stacked 2-D blocks of ny x nx pixels. A pixel
 * is a peak pixel when bins[i] >= 0, v is finite, v <= hot and
 * v > thr[bins[i]]. Every peak pixel must lie in a span (from
 * lcls_accumulate with cand_thr <= thr); spans whose span_max is not above
 * their bin's threshold are skipped (the bin from span_bin, or bins[start]
 * when span_bin is NULL). Neighbours (4- or 8-connectivity)
 * connect only inside the same block and, when panel is not NULL, the same
 * panel id. A component counts when min_pix <= size <= max_pix;
 * out[0] = number of counted components, out[1] = sum over their pixels of
 * v - bg[bins[i]], out[2] = number of peak pixels visited.
 * visited (n bytes) must be all zero on entry and is all zero on exit;
 * stack holds n int32. With panel_t (offset_px and offset_d NULL), pixel i's
 * offset is offset + panel_t[pixel_panel[i]]. Returns 0, -1 for an unknown
 * dtype, -3 for a misused panel_t.
 */
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
                    int64_t n_spans, uint8_t *visited, int32_t *stack, double *out);

/* Per-panel common mode: the lower median of the photon values v below
 * `below` (offsets as in the accumulation kernels) of each panel's sampled
 * pixels (pixels i with i % stride == 0; panel[i] in [0, n_panels), -1 =
 * ignored; non-finite values ignored), to the resolution of a histogram.
 * The frame is read as n_runs runs of pixels of one panel id: run r is
 * [run_start[r], run_start[r + 1]) (run_start[0] = 0, run_start[n_runs] =
 * n_pixels, panel constant in each; panel[] is only read at run starts), so
 * no per-pixel panel array is streamed:
 * bin 0 holds the values under lo, bins 1..n_hist split [lo, below) evenly
 * (k = floor((v - lo) * n_hist / (below - lo)) + 1, at most n_hist), and the
 * median is the mean of the values of the bin holding the rank (n - 1) / 2
 * value (0 for a panel without such values). Sampled pixel i is counted in
 * copy (i / stride) % 4 of the histograms; the sums of a bin are added as
 * (copy0 + copy1) + (copy2 + copy3). Integer frames of at most 16 bits
 * with a scalar scale > 0 and no offset_px are histogrammed by raw value
 * x = frame[i] - offset_d[i] instead when the raw values of [lo, below) fit
 * in n_hist - 1 slots (exact counts, so the same median bin); the bin's mean
 * is then v(x) when the bin holds one raw value, else sum(n_x v(x)) / n
 * (equal to the float64 sums up to rounding). hist_count, hist_sum:
 * 4 * n_panels * (n_hist + 1) scratch.
 * The per-pixel offset that subtracts the median from v is
 *     o_i = (float)(off_i + median[panel[i]] / scale_i)
 * (off_i where panel[i] < 0 or scale_i <= 0). When offset_d_out is not NULL
 * and every o_i - d_base is an integer in [-32768, 32767], offset_d_out
 * receives those integers (offset_d of the other kernels with offset =
 * d_base) and 0 is returned; otherwise offset_out (when not NULL) receives
 * o_i and the return value is 1 with offset_d_out, 0 without. Returns -1 for
 * an unknown dtype, -2 for a bad range or stride. */
int lcls_panel_common_mode(const void *frame, int dtype, int64_t n_pixels,
                           const int32_t *panel, int32_t n_panels,
                           const int32_t *run_start, int64_t n_runs,
                           const float *offset_px, const float *scale_px,
                           const int16_t *offset_d, double offset, double scale,
                           double below, double lo, int32_t n_hist, int64_t stride,
                           int64_t *hist_count, double *hist_sum, double *median,
                           float *offset_out, int16_t *offset_d_out, double d_base);

#endif
