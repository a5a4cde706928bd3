"""Per-frame hot loops: C kernels (``kernels/*.c``) with a numpy reference implementation.

Two kernels do all the per-pixel work of :class:`lcls_dl.ingest.preprocess.FramePreprocessor`:

``accumulate``
    One pass over the frame: convert ADU to photons, skip masked pixels, exclude hot and
    non-finite pixels, and add each pixel's value and squared value to its (q, phi) bin;
    also the largest pixel of every bin (for the polar image's max-SNR channel), of the
    frame, and the spans holding candidate peak pixels ("lit" pixels,
    value above an absolute threshold).
``find_peaks``
    Grow connected components of peak pixels (value above a per-bin threshold) from the
    candidate spans, inside one detector block/panel, and count those of acceptable size.

The numpy functions in this module (:class:`NumpyKernels`) define the semantics; the C
functions (:class:`CKernels`, built into ``lcls_dl._kernels`` at install time and called
through ctypes) compute the same thing in two passes over memory, and
``tests/test_kernels.py`` checks that they agree.

:func:`get_kernels` returns the C kernels when the extension is present and the numpy
ones otherwise, with one :class:`KernelFallbackWarning`. The environment variable
``LCLS_DL_KERNELS`` selects explicitly: ``numpy`` (the reference, no warning), ``c``
(error if the extension is missing) or ``auto`` (default).

Photon value of pixel ``i``: ``v = (float64(frame[i]) - offset_i) * scale_i`` where
``offset``/``scale`` are scalars or per-pixel float32 arrays.
"""
import ctypes
import importlib.util
import os
import warnings
from dataclasses import dataclass

import numpy as np

#: ABI version the loader expects from ``lcls_dl._kernels`` (``LCLS_KERNELS_ABI``).
ABI_VERSION = 5

#: Frame dtypes the C kernels read directly (others are converted to float64 first).
DTYPE_CODES = {
    np.dtype(np.uint8): 0, np.dtype(np.int8): 1,
    np.dtype(np.uint16): 2, np.dtype(np.int16): 3,
    np.dtype(np.uint32): 4, np.dtype(np.int32): 5,
    np.dtype(np.float32): 6, np.dtype(np.float64): 7,
}


class KernelFallbackWarning(UserWarning):
    """The compiled kernels are missing; the (slower) numpy reference is used."""


@dataclass
class Accumulation:
    """Result of :meth:`accumulate` for one frame.

    Arrays may be views into a reused workspace: valid until the next call.

    Attributes
    ----------
    sum, sumsq : ndarray of float64, (n_bins,)
        Sum of photon values and of their squares per bin (included pixels only).
    excluded : ndarray of int32, (n_bins,)
        Pixels of each bin excluded from this frame (hot or non-finite).
    binmax : ndarray of float64, (n_bins,)
        Largest included photon value of each bin (-inf where the bin has none).
    span_start, span_len : ndarray of int32
        Candidate spans: ascending, non-overlapping pixel ranges, each inside one bin,
        that together hold every "lit" pixel (included, value above ``cand_thr``). The
        reference returns one span per lit pixel; the C kernels whole runs or 16-pixel
        chunks.
    span_max : ndarray of float64
        Largest included value in each span.
    n_lit : int
        Number of lit pixels.
    vmax : float
        Largest included photon value (-inf when no pixel is included).
    n_nonfinite : int
        Non-finite values among the pixels with ``bins >= 0``.
    """

    sum: np.ndarray
    sumsq: np.ndarray
    excluded: np.ndarray
    binmax: np.ndarray
    span_start: np.ndarray
    span_len: np.ndarray
    span_max: np.ndarray
    n_lit: int
    vmax: float
    n_nonfinite: int


def as_kernel_input(frame):
    """Flat, C-contiguous, native-endian view of ``frame`` in a dtype the kernels read.

    No copy is made for C-contiguous frames of a supported dtype (uint8/16/32,
    int8/16/32, float32, float64); anything else is converted to float64.

    Examples
    --------
    >>> a = np.zeros((2, 3), np.uint16)
    >>> np.shares_memory(as_kernel_input(a), a)
    True
    """
    a = np.asarray(frame)
    if a.dtype not in DTYPE_CODES or not a.dtype.isnative:
        a = a.astype(np.float64)
    return np.ascontiguousarray(a).reshape(-1)


def photons(flat, offset, scale):
    """Photon values ``(float64(flat) - offset) * scale`` (reference definition)."""
    return (flat.astype(np.float64) - offset) * scale


class NumpyKernels:
    """Reference implementation (readable, defines the semantics; also the fallback)."""

    name = "numpy"

    def workspace(self, bins, n_bins):
        """Per-geometry data and scratch buffers reused across frames (none needed here)."""
        return None

    def accumulate(self, flat, bins, n_bins, offset, scale, hot, cand_thr, ws=None):
        """Fused pass: per-bin sums, exclusions, max and peak candidates.

        Parameters
        ----------
        flat : ndarray, (n,)
            Raw frame, flattened (see :func:`as_kernel_input`).
        bins : ndarray of int32, (n,)
            Bin of each pixel, -1 for masked or out-of-range pixels.
        n_bins : int
        offset, scale : float or ndarray of float32, (n,)
            ADU -> photons: ``(raw - offset) * scale``.
        hot : float
            Pixels with a value above it are excluded from this frame (``inf`` = off).
        cand_thr : float
            Included pixels above it are peak candidates.

        Returns
        -------
        Accumulation
            Here each lit pixel is its own span.
        """
        v = photons(flat, offset, scale)
        inside = bins >= 0
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(v)
            good = inside & finite & (v <= hot)
        bad = inside & ~good
        b, vg = bins[good], v[good]
        total = np.bincount(b, weights=vg, minlength=n_bins)
        sumsq = np.bincount(b, weights=vg * vg, minlength=n_bins)
        excluded = np.bincount(bins[bad], minlength=n_bins).astype(np.int32)
        binmax = np.full(n_bins, -np.inf)
        np.maximum.at(binmax, b, vg)
        lit = np.flatnonzero(good & (np.where(good, v, -np.inf) > cand_thr))
        return Accumulation(
            sum=total, sumsq=sumsq, excluded=excluded, binmax=binmax,
            span_start=lit.astype(np.int32), span_len=np.ones(lit.size, np.int32),
            span_max=v[lit], n_lit=int(lit.size),
            vmax=float(vg.max()) if vg.size else -np.inf,
            n_nonfinite=int(np.count_nonzero(inside & ~finite)),
        )

    def find_peaks(self, flat, block_shape, bins, offset, scale, hot, thr, bg, panel,
                   connectivity, min_pix, max_pix, acc, ws=None):
        """Count connected components of peak pixels of acceptable size.

        A peak pixel has ``bins >= 0``, a finite value ``v <= hot`` and ``v > thr[bin]``.
        Components use 4- or 8-``connectivity`` inside each 2-D block of
        ``block_shape = (n_blocks, ny, nx)`` and, when ``panel`` (int32, (n,)) is given,
        only between pixels of the same panel id. A component counts when
        ``min_pix <= size <= max_pix``. ``thr`` must be ``>=`` the candidate threshold
        used in :meth:`accumulate`, whose result is ``acc`` (the C version grows components
        from its candidate spans; this reference does not need them).

        Returns
        -------
        n_peaks : int
        intensity : float
            Sum over the counted components' pixels of ``v - bg[bin]``.
        n_peak_pixels : int
            All peak pixels, counted or not.
        """
        from scipy import ndimage

        v = photons(flat, offset, scale)
        inside = bins >= 0
        peak = np.zeros(v.shape, bool)
        with np.errstate(invalid="ignore"):
            ok = inside & np.isfinite(v) & (v <= hot)
            peak[ok] = v[ok] > thr[bins[ok]]
        structure = np.ones((3, 3), bool) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
        labels = np.zeros(v.shape, np.int64).reshape(block_shape)
        peak3 = peak.reshape(block_shape)
        panel3 = None if panel is None else panel.reshape(block_shape)
        n_lab = 0
        for m in range(block_shape[0]):
            ids = [None] if panel3 is None else np.unique(panel3[m][peak3[m]])
            for pid in ids:
                sel = peak3[m] if pid is None else peak3[m] & (panel3[m] == pid)
                lab, k = ndimage.label(sel, structure=structure)
                labels[m][sel] = lab[sel] + n_lab
                n_lab += k
        labels = labels.reshape(-1)
        size = np.bincount(labels[peak], minlength=n_lab + 1)
        signal = np.bincount(labels[peak], weights=v[peak] - bg[bins[peak]], minlength=n_lab + 1)
        keep = (size >= min_pix) & (size <= max_pix)
        keep[0] = False
        return int(keep.sum()), float(signal[keep].sum()), int(np.count_nonzero(peak))


class _CWorkspace:
    """Runs of equal bins (precomputed once per geometry) and scratch buffers."""

    def __init__(self, bins, n_bins):
        self.bins = bins  # the caller's array: identity check per call, no copy
        bins = np.ascontiguousarray(bins, np.int32).reshape(-1)
        n = bins.size
        self.n_pixels, self.n_bins = n, n_bins
        change = np.flatnonzero(bins[1:] != bins[:-1]) + 1
        starts = np.concatenate(([0], change)).astype(np.int64)
        ends = np.concatenate((change, [n])).astype(np.int64)
        keep = bins[starts] >= 0 if n else np.zeros(0, bool)
        self.run_start = np.ascontiguousarray(starts[keep], np.int32)
        self.run_len = np.ascontiguousarray(ends[keep] - starts[keep], np.int32)
        self.run_bin = np.ascontiguousarray(bins[starts[keep]], np.int32)
        self.sum = np.zeros(n_bins, np.float64)
        self.sumsq = np.zeros(n_bins, np.float64)
        self.excluded = np.zeros(n_bins, np.int32)
        self.binmax = np.zeros(n_bins, np.float64)
        cap = self.run_start.size + n // 16 + 1
        self.span_start = np.empty(cap, np.int32)
        self.span_len = np.empty(cap, np.int32)
        self.span_max = np.empty(cap, np.float64)
        self.visited = np.zeros(n, np.uint8)
        self.stack = np.empty(n + 1, np.int32)
        self.counts = np.zeros(3, np.int64)  # n_spans, n_lit, n_nonfinite
        self.out = np.zeros(4, np.float64)  # vmax | n_peaks, intensity, n_pixels


def _ptr(a):
    return None if a is None else a.ctypes.data


def _offset_args(offset, scale, n):
    """Split offset/scale into (per-pixel pointer or None, scalar) pairs."""
    args = []
    for x in (offset, scale):
        if np.ndim(x) == 0:
            args.append((None, float(x)))
        else:
            a = np.asarray(x)
            if a.dtype != np.float32 or a.shape != (n,) or not a.flags.c_contiguous:
                raise ValueError("per-pixel offset/scale must be C-contiguous float32 of the frame size")
            args.append((a, 0.0))
    return args


class CKernels(NumpyKernels):
    """The compiled kernels of ``lcls_dl._kernels``, called through ctypes."""

    name = "c"

    def __init__(self, path):
        lib = ctypes.CDLL(path)
        if lib.lcls_abi_version() != ABI_VERSION:
            raise OSError(f"{path}: kernel ABI {lib.lcls_abi_version()} != {ABI_VERSION}")
        P, I64, D, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
        lib.lcls_accumulate.argtypes = [P, I, I64, I64, P, P, P, ctypes.c_int32, P, P, D, D, D, D,
                                        P, P, P, P, P, P, P, P, P]
        lib.lcls_accumulate.restype = I
        lib.lcls_find_peaks.argtypes = [P, I, I64, I64, I64, P, P, P, D, D, D, P, P, P, I,
                                        I64, I64, P, P, P, I64, P, P, P]
        lib.lcls_find_peaks.restype = I
        self.lib, self.path = lib, path

    def workspace(self, bins, n_bins):
        return _CWorkspace(bins, n_bins)

    @staticmethod
    def _check(flat, bins, ws, n_bins=None):
        if flat.dtype not in DTYPE_CODES or not flat.flags.c_contiguous or flat.ndim != 1:
            raise ValueError("frame must be a flat C-contiguous array (see as_kernel_input)")
        if bins.dtype != np.int32 or bins.shape != flat.shape or not bins.flags.c_contiguous:
            raise ValueError("bins must be C-contiguous int32 of the frame size")
        if not (ws.bins is bins or np.array_equal(ws.bins, bins)) or (
                n_bins is not None and ws.n_bins != n_bins):
            raise ValueError("workspace was made for other bins")

    def accumulate(self, flat, bins, n_bins, offset, scale, hot, cand_thr, ws=None):
        if ws is None:
            ws = self.workspace(bins, n_bins)
        self._check(flat, bins, ws, n_bins)
        (off_px, off), (sc_px, sc) = _offset_args(offset, scale, flat.size)
        rc = self.lib.lcls_accumulate(
            flat.ctypes.data, DTYPE_CODES[flat.dtype], flat.size, ws.run_start.size,
            ws.run_start.ctypes.data,
            ws.run_len.ctypes.data, ws.run_bin.ctypes.data, n_bins,
            _ptr(off_px), _ptr(sc_px), off, sc, float(hot), float(cand_thr),
            ws.sum.ctypes.data, ws.sumsq.ctypes.data, ws.excluded.ctypes.data,
            ws.binmax.ctypes.data,
            ws.span_start.ctypes.data, ws.span_len.ctypes.data, ws.span_max.ctypes.data,
            ws.counts.ctypes.data, ws.out.ctypes.data)
        if rc != 0:
            raise ValueError(f"lcls_accumulate failed ({rc})")
        n_spans, n_lit, n_nonfinite = (int(x) for x in ws.counts)
        return Accumulation(sum=ws.sum, sumsq=ws.sumsq, excluded=ws.excluded, binmax=ws.binmax,
                            span_start=ws.span_start[:n_spans], span_len=ws.span_len[:n_spans],
                            span_max=ws.span_max[:n_spans], n_lit=n_lit,
                            vmax=float(ws.out[0]), n_nonfinite=n_nonfinite)

    def find_peaks(self, flat, block_shape, bins, offset, scale, hot, thr, bg, panel,
                   connectivity, min_pix, max_pix, acc, ws=None):
        if ws is None:
            ws = self.workspace(bins, int(thr.size))
        self._check(flat, bins, ws)
        n_mod, ny, nx = (int(x) for x in block_shape)
        if n_mod * ny * nx != flat.size:
            raise ValueError("block_shape does not match the frame size")
        thr = np.ascontiguousarray(thr, np.float64)
        bg = np.ascontiguousarray(bg, np.float64)
        if thr.size < ws.n_bins or bg.size < ws.n_bins:
            raise ValueError("thr and bg need one value per bin")
        if panel is not None and (panel.dtype != np.int32 or panel.shape != flat.shape
                                  or not panel.flags.c_contiguous):
            raise ValueError("panel must be C-contiguous int32 of the frame size")
        start = np.ascontiguousarray(acc.span_start, np.int32)
        length = np.ascontiguousarray(acc.span_len, np.int32)
        vmax = np.ascontiguousarray(acc.span_max, np.float64)
        if not start.size == length.size == vmax.size:
            raise ValueError("span arrays differ in length")
        # spans are ascending and non-overlapping (see Accumulation): check the ends only
        if start.size and (start[0] < 0 or int(start[-1]) + int(length[-1]) > flat.size):
            raise ValueError("candidate spans outside the frame")
        (off_px, off), (sc_px, sc) = _offset_args(offset, scale, flat.size)
        rc = self.lib.lcls_find_peaks(
            flat.ctypes.data, DTYPE_CODES[flat.dtype], n_mod, ny, nx, bins.ctypes.data,
            _ptr(off_px), _ptr(sc_px), off, sc, float(hot), thr.ctypes.data, bg.ctypes.data,
            _ptr(panel), int(connectivity), int(min_pix), int(max_pix),
            start.ctypes.data, length.ctypes.data, vmax.ctypes.data, start.size,
            ws.visited.ctypes.data,
            ws.stack.ctypes.data, ws.out.ctypes.data + 8)
        if rc != 0:
            raise ValueError(f"lcls_find_peaks failed ({rc})")
        return int(ws.out[1]), float(ws.out[2]), int(ws.out[3])


_CACHE = {}


def _extension_path():
    spec = importlib.util.find_spec("lcls_dl._kernels")
    return None if spec is None else spec.origin


def get_kernels(which=None):
    """The kernels to use: C where built, else numpy with one warning.

    Parameters
    ----------
    which : {"auto", "c", "numpy"}, optional
        Default: the ``LCLS_DL_KERNELS`` environment variable, else ``"auto"``.

    Returns
    -------
    CKernels or NumpyKernels

    Examples
    --------
    >>> get_kernels("numpy").name
    'numpy'
    """
    which = (which or os.environ.get("LCLS_DL_KERNELS") or "auto").lower()
    if which not in ("auto", "c", "numpy"):
        raise ValueError(f"LCLS_DL_KERNELS must be auto, c or numpy, not {which!r}")
    if which in _CACHE:
        return _CACHE[which]
    if which == "numpy":
        kernels = NumpyKernels()
    else:
        try:
            path = _extension_path()
            if path is None:
                raise OSError("lcls_dl._kernels is not built")
            kernels = CKernels(path)
        except OSError as exc:
            if which == "c":
                raise
            warnings.warn(f"C kernels unavailable ({exc}); using the slower numpy reference "
                          "implementation (reinstall with a C compiler to build them)",
                          KernelFallbackWarning, stacklevel=2)
            kernels = NumpyKernels()
    _CACHE[which] = kernels
    return kernels
