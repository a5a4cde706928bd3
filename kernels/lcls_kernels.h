/* lcls-dl C kernels: fused per-frame accumulation and peak finding.
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
#define LCLS_KERNELS_ABI 5
int lcls_abi_version(void);

/* One pass over a frame, by runs of consecutive pixels sharing a bin.
 *
 * Run r covers pixels [run_start[r], run_start[r] + run_len[r]) of bin
 * run_bin[r] (masked / out-of-range pixels belong to no run; runs are in
 * ascending pixel order). The photon value of pixel i is
 *     v = ((double)frame[i] - off_i) * scale_i
 * with off_i = offset_px ? offset_px[i] : offset, scale_i likewise.
 * Pixels with v > hot or v non-finite are excluded: excluded[bin]++ (and
 * non-finite ones counted in counts[2]). Every other pixel adds v to sum[bin]
 * and v*v to sumsq[bin] and updates *vmax and bmax[bin] (largest included
 * value of the bin, -HUGE_VAL when none). Pixels with v > cand_thr ("lit",
 * counted in counts[1]) are reported as candidate spans: ascending,
 * non-overlapping ranges [span_start[k], span_start[k] + span_len[k]) inside
 * one run that contain every lit pixel, with span_max[k] the largest
 * included value of the span; counts[0] = number of spans (capacity:
 * n_runs + n_pixels / 16 + 1). sum, sumsq, excluded, bmax (n_bins each) are
 * overwritten. n_pixels is the frame size (no read goes past it).
 * Returns 0, or -1 for an unknown dtype.
 */
int lcls_accumulate(const void *frame, int dtype, int64_t n_pixels,
                    int64_t n_runs,
                    const int32_t *run_start, const int32_t *run_len,
                    const int32_t *run_bin, int32_t n_bins,
                    const float *offset_px, const float *scale_px,
                    double offset, double scale, double hot, double cand_thr,
                    double *sum, double *sumsq, int32_t *excluded, double *bmax,
                    int32_t *span_start, int32_t *span_len, double *span_max,
                    int64_t *counts, double *vmax);

/* Connected components of peak pixels, grown from the candidate spans.
 *
 * The frame is viewed as n_mod stacked 2-D blocks of ny x nx pixels. A pixel
 * is a peak pixel when bins[i] >= 0, v is finite, v <= hot and
 * v > thr[bins[i]]. Every peak pixel must lie in a span (from
 * lcls_accumulate with cand_thr <= thr); spans whose span_max is not above
 * their bin's threshold are skipped. Neighbours (4- or 8-connectivity)
 * connect only inside the same block and, when panel is not NULL, the same
 * panel id. A component counts when min_pix <= size <= max_pix;
 * out[0] = number of counted components, out[1] = sum over their pixels of
 * v - bg[bins[i]], out[2] = number of peak pixels visited.
 * visited (n bytes) must be all zero on entry and is all zero on exit;
 * stack holds n int32. Returns 0, or -1 for an unknown dtype.
 */
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
                    uint8_t *visited, int32_t *stack, double *out);

#endif
