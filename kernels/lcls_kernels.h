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
#define LCLS_KERNELS_ABI 2
int lcls_abi_version(void);

/* One pass over a frame, by runs of consecutive pixels sharing a bin.
 *
 * Run r covers pixels [run_start[r], run_start[r] + run_len[r]) of bin
 * run_bin[r] (masked / out-of-range pixels belong to no run; runs are in
 * ascending pixel order). The photon value of pixel i is
 *     v = ((double)frame[i] - off_i) * scale_i
 * with off_i = offset_px ? offset_px[i] : offset, scale_i likewise.
 * Pixels with v > hot or v non-finite are excluded: excluded[bin]++ (and
 * non-finite ones counted in *n_nonfinite). Every other pixel adds v to
 * sum[bin] and v*v to sumsq[bin], updates *vmax, and is appended to cand
 * (ascending pixel index; capacity: number of pixels) when v > cand_thr.
 * sum, sumsq, excluded (n_bins each) are overwritten.
 * Returns 0, or -1 for an unknown dtype.
 */
int lcls_accumulate(const void *frame, int dtype, int64_t n_runs,
                    const int32_t *run_start, const int32_t *run_len,
                    const int32_t *run_bin, int32_t n_bins,
                    const float *offset_px, const float *scale_px,
                    double offset, double scale, double hot, double cand_thr,
                    double *sum, double *sumsq, int32_t *excluded,
                    int32_t *cand, int64_t *n_cand,
                    double *vmax, int64_t *n_nonfinite);

/* Connected components of peak pixels, grown from the candidate list.
 *
 * The frame is viewed as n_mod stacked 2-D blocks of ny x nx pixels. A pixel
 * is a peak pixel when bins[i] >= 0, v is finite, v <= hot and
 * v > thr[bins[i]]. Neighbours (4- or 8-connectivity) connect only inside
 * the same block and, when panel is not NULL, the same panel id. A component
 * counts when min_pix <= size <= max_pix; out[0] = number of counted
 * components, out[1] = sum over their pixels of v - bg[bins[i]],
 * out[2] = number of peak pixels visited.
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
                    const int32_t *cand, int64_t n_cand,
                    uint8_t *visited, int32_t *stack, double *out);

#endif
