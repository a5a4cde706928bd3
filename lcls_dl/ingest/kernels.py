"""Per-frame hot loops: C kernels (``kernels/*.c``) with a numpy reference implementation.

These kernels do all the per-pixel work of :class:`lcls_dl.ingest.preprocess.FramePreprocessor`:

``accumulate``
    One pass over the frame: convert ADU to photons, skip masked pixels, exclude hot and
    non-finite pixels, and add each pixel's value and squared value to its (q, phi) bin;
    also the largest pixel of every bin (for the polar image's max-SNR channel), of the
    frame, and the spans holding candidate peak pixels ("lit" pixels,
    value above an absolute threshold).
``profile_accumulate``
    The radial profile's pass: per bin only the sum of included photon values and the
    excluded (hot or non-finite) pixels -- no squares, maxima or candidates.
``common_mode`` (optional)
    Per-panel common mode: the median of each panel's photon values below ~0.5 photon
    (from a small histogram of every ``stride``-th pixel), returned as the per-pixel
    offset that subtracts it (a :class:`SplitOffset` of int16 deltas where it is whole
    ADU, as on integer frames), or with ``panel_table=True`` a :class:`PanelOffset`: one
    integer offset per panel, that the C kernels subtract per chunk of pixels (chunks of
    a workspace built with the panel ids never straddle panels) instead of reading a
    per-pixel offset array. The C kernel histograms integer frames by raw value
    (exact counts, the same median bin; the bin's mean is summed per raw value, so it
    may differ from the reference in the last bit) and reads the panel ids once per run
    of equal ids.
``find_peaks``
    Grow connected components of peak pixels (value above a per-bin threshold) from the
    candidate spans, inside one detector block/panel, and count those of acceptable size.

The numpy functions in this module (:class:`NumpyKernels`) define the semantics; the C
functions (:class:`CKernels`, built into ``lcls_dl._kernels`` at install time and called
through ctypes) compute the same thing from a table of bin "chunks" (at most 16
consecutive pixels of one bin, precomputed per geometry by :meth:`CKernels.workspace`),
and ``tests/test_kernels.py`` checks that they agree.

:func:`get_kernels` returns the C kernels when the extension is present and the numpy
ones otherwise, with one :class:`KernelFallbackWarning`. The environment variable
``LCLS_DL_KERNELS`` selects explicitly: ``numpy`` (the reference, no warning), ``c``
(error if the extension is missing) or ``auto`` (default).

Photon value of pixel ``i``: ``v = (float64(frame[i]) - offset_i) * scale_i`` where
``offset``/``scale`` are scalars or per-pixel float32 arrays; ``offset`` may also be a
:class:`SplitOffset` (integer ADU offsets, e.g. an integral dark frame, as int16 deltas from
a base: half the memory traffic of float32, and integer frames stay on the exact integer
path of the C kernels), or a :class:`PanelOffset` (one integer ADU offset per panel, e.g. a
per-panel common mode: the C kernels subtract it per chunk when their workspace was built
with the panel ids, so no per-pixel offset is filled or read).
"""
import ctypes
import importlib.util
import os
import warnings
from dataclasses import dataclass

import numpy as np

#: ABI version the loader expects from ``lcls_dl._kernels`` (``LCLS_KERNELS_ABI``).
ABI_VERSION = 8

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
        reference returns one span per lit pixel; the C kernels the chunks (at most 16
        pixels of one bin, see :func:`bin_chunks`) holding one.
    span_max : ndarray of float64
        Largest included value in each span.
    n_lit : int
        Number of lit pixels.
    vmax : float
        Largest included photon value (-inf when no pixel is included).
    n_nonfinite : int
        Non-finite values among the pixels with ``bins >= 0``.
    span_bin : ndarray of int32 or None
        Bin of each span (lets :meth:`find_peaks` skip spans below their bin's threshold
        without reading the bin table).
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
    span_bin: np.ndarray = None


@dataclass
class ProfileAccumulation:
    """Result of :meth:`profile_accumulate` for one frame (arrays may be reused workspace).

    Attributes
    ----------
    sum : ndarray of float64, (n_bins,)
        Sum of the included photon values per bin.
    excluded : ndarray of int32, (n_bins,)
        Pixels of each bin excluded from this frame (hot or non-finite).
    n_nonfinite : int
        Non-finite values among the pixels with ``bins >= 0``.
    """

    sum: np.ndarray
    excluded: np.ndarray
    n_nonfinite: int


@dataclass(eq=False)
class SplitOffset:
    """Per-pixel integer ADU offsets ``base + delta[i]`` (``delta`` int16, flat frame size).

    The same photon values as the float32 array :meth:`values` (every value is an integer
    below 2**24 in magnitude, exact in float32), with 2 bytes per pixel instead of 4; the C
    kernels keep integer frames (uint8/int8/uint16/int16, scalar scale) on their exact
    integer path with it. Build it with :func:`split_offset`.
    """

    base: float
    delta: np.ndarray

    def values(self):
        """The offsets as float64 (n,)."""
        return self.base + self.delta.astype(np.float64)


#: Preferred base of :func:`split_offset`: frames then lie in ``[0, 16383]`` after
#: subtracting ``delta`` (the C kernels' vector path) from 1024 ADU below the offset to
#: 15359 above it.
SPLIT_OFFSET_BASE = 1024.0


def split_offset(offset):
    """``offset`` (per-pixel array) as a :class:`SplitOffset`, or None where it is not one.

    It is one when every value is an integer and the values span less than 65536 ADU; the
    base is :data:`SPLIT_OFFSET_BASE` where the deltas fit in int16, else the nearest base
    that makes them fit.

    Examples
    --------
    >>> s = split_offset(np.array([1500.0, 1490.0, 1512.0], np.float32))
    >>> s.base, s.delta.tolist()
    (1024.0, [476, 466, 488])
    >>> split_offset(np.array([1500.5])) is None
    True
    """
    a = np.asarray(offset, np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
        return None
    lo_, hi_ = float(a.min()), float(a.max())
    if hi_ - lo_ > 65535 or max(abs(lo_), abs(hi_)) >= 2 ** 24:
        return None
    base = min(max(SPLIT_OFFSET_BASE, hi_ - 32767.0), lo_ + 32768.0)
    return SplitOffset(base, np.ascontiguousarray((a - base).astype(np.int16)))


@dataclass(eq=False)
class PanelOffset:
    """Per-panel integer ADU offsets: pixel ``i`` has offset ``base + table[panel[i] + 1]``.

    ``panel`` (int32, flat frame size) holds panel ids ``0..n_panels-1`` and -1 for
    pixels of no panel; ``table`` (int16, ``n_panels + 1``) holds the deltas from ``base``,
    ``table[0]`` that of the pixels of no panel. The same photon values as the
    :class:`SplitOffset` :meth:`split` (and the float array :meth:`values`); the C kernels
    apply it per chunk when their workspace was built with this ``panel`` array
    (:meth:`CKernels.workspace`), else they use :meth:`split`. Made by
    :meth:`NumpyKernels.common_mode` with ``panel_table=True``.

    Examples
    --------
    >>> o = PanelOffset(1024.0, np.array([0, 5, -3], np.int16), np.array([1, 0, -1], np.int32))
    >>> o.values().tolist()
    [1021.0, 1029.0, 1024.0]
    """

    base: float
    table: np.ndarray
    panel: np.ndarray

    def split(self):
        """The same offsets as a :class:`SplitOffset` (int16 per pixel)."""
        return SplitOffset(self.base, np.ascontiguousarray(self.table[self.panel + 1], np.int16))

    def values(self):
        """The offsets as float64 (n,)."""
        return self.base + self.table[self.panel + 1].astype(np.float64)


def _panel_table(median, offset, scale, base):
    """int16 table of :class:`PanelOffset` (deltas from ``base`` of
    ``float32(offset + median[p] / scale)``, entry 0 ``float32(offset)``), or None where
    one of them is not an integer or does not fit (the check of the C kernel)."""
    o = np.empty(median.size + 1, np.float64)
    o[0] = offset
    o[1:] = offset + median / scale
    o = o.astype(np.float32).astype(np.float64)
    d = o - base
    if not np.all((o == np.floor(o)) & (d >= -32768) & (d <= 32767)):
        return None
    return d.astype(np.int16)


def _table_ok(offset, scale, split, panel_table):
    """Whether :meth:`~NumpyKernels.common_mode` may return a :class:`PanelOffset`."""
    return (panel_table and split and not isinstance(offset, (SplitOffset, PanelOffset))
            and np.ndim(offset) == 0 and np.ndim(scale) == 0 and float(scale) > 0)


def _panel_runs(panel):
    """Starts of the runs of equal consecutive panel ids, then ``panel.size`` (int32)."""
    if panel.size == 0:
        return np.zeros(1, np.int32)  # no run
    change = np.flatnonzero(panel[1:] != panel[:-1]) + 1
    return np.ascontiguousarray(np.concatenate(([0], change, [panel.size])), np.int32)


def _split_base(offset):
    """Base of the split offsets that :meth:`~NumpyKernels.common_mode` returns."""
    return offset.base if isinstance(offset, SplitOffset) else SPLIT_OFFSET_BASE


def offset_values(offset):
    """Scalar offset as float, per-pixel offsets (array or :class:`SplitOffset`) as an array."""
    if isinstance(offset, (SplitOffset, PanelOffset)):
        return offset.values()
    return offset


@dataclass
class CommonMode:
    """Result of :meth:`common_mode` (arrays may be reused workspace).

    Attributes
    ----------
    median : ndarray of float64, (n_panels,)
        Common mode of each panel, photons (0 for a panel without pixels below the limit).
    offset : ndarray of float32, (n,), SplitOffset or PanelOffset
        Per-pixel offset that subtracts it: ``float32(offset_i + median[panel_i] / scale_i)``;
        with ``split=True``, a :class:`SplitOffset` of the same values where they are all
        integers that fit (:func:`split_offset`); with ``panel_table=True`` too, a
        :class:`PanelOffset` of them where the offset and scale are scalars.
    """

    median: np.ndarray
    offset: object


#: Common-mode histogram: photons below the limit covered, and bins per photon.
COMMON_MODE_RANGE = 4.0
COMMON_MODE_BINS_PER_PHOTON = 128


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
    return (flat.astype(np.float64) - offset_values(offset)) * scale


class NumpyKernels:
    """Reference implementation (readable, defines the semantics; also the fallback)."""

    name = "numpy"

    def workspace(self, bins, n_bins, panel=None):
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
            span_max=v[lit], n_lit=int(lit.size), span_bin=bins[lit].astype(np.int32),
            vmax=float(vg.max()) if vg.size else -np.inf,
            n_nonfinite=int(np.count_nonzero(inside & ~finite)),
        )

    def profile_accumulate(self, flat, bins, n_bins, offset, scale, hot, ws=None):
        """Radial-profile pass: per-bin sums of included photon values and exclusions.

        The same pixels as :meth:`accumulate` (same masking, offset/scale, hot and
        non-finite exclusion) and the same ``sum``/``excluded``/``n_nonfinite``, without
        the squares, maxima and peak candidates that the profile does not need.

        Returns
        -------
        ProfileAccumulation

        Examples
        --------
        >>> k = NumpyKernels()
        >>> r = k.profile_accumulate(np.array([1, 2, 90, 4], np.uint16),
        ...                          np.array([0, 0, 1, -1], np.int32), 2, 0.0, 1.0, 50.0)
        >>> r.sum.tolist(), r.excluded.tolist()
        ([3.0, 0.0], [0, 1])
        """
        v = photons(flat, offset, scale)
        inside = bins >= 0
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(v)
            good = inside & finite & (v <= hot)
        return ProfileAccumulation(
            sum=np.bincount(bins[good], weights=v[good], minlength=n_bins),
            excluded=np.bincount(bins[inside & ~good], minlength=n_bins).astype(np.int32),
            n_nonfinite=int(np.count_nonzero(inside & ~finite)))

    def common_mode(self, flat, panel, n_panels, offset, scale, below, ws=None, stride=1,
                    split=False, panel_table=False):
        """Per-panel common mode (median of the "no photon" pixels) and its correction.

        For each panel, the lower median of the finite photon values ``v < below`` of its
        sampled pixels (pixel index ``i % stride == 0``; ``panel`` int32, (n,), ids
        ``0..n_panels-1``, -1 = not used), to the resolution of a histogram: bin 0 holds
        the values under ``lo = below - COMMON_MODE_RANGE``,
        ``COMMON_MODE_BINS_PER_PHOTON`` bins per photon split ``[lo, below)``, and the
        median is the mean of the values of the bin holding the rank ``(n - 1) // 2``
        value (exact for integer ADU frames whose ADU step is above 1/128 photon). The
        values of a bin are summed in four parts (sample index ``i // stride`` modulo 4)
        added as ``(s0 + s1) + (s2 + s3)``, as the C kernel does.

        Sampling (``stride > 1``) is deterministic: always the same pixels. On a
        185 x 194 ASIC, ``stride=4`` leaves ~9,000 pixels and the median moves by less
        than 0.01 photon (``tests/test_kernels.py`` checks it on Poisson frames with
        Gaussian read noise).

        Returns
        -------
        CommonMode
            ``offset`` (float32, (n,)): ``offset_i + median[panel_i] / scale_i``, the
            offset that removes the common mode (``offset_i`` where ``panel_i < 0`` or
            ``scale_i <= 0``); with ``split``, a :class:`SplitOffset` of the same values
            when they are all integers whose deltas from the base (that of ``offset`` when
            it is a :class:`SplitOffset`, else :data:`SPLIT_OFFSET_BASE`) fit in int16.
            With ``split`` and ``panel_table``, a scalar ``offset`` and a scalar
            ``scale > 0``, a :class:`PanelOffset` (``panel`` itself, one int16 delta per
            panel) of the same values where they are all such integers: no per-pixel array
            is filled.

        Examples
        --------
        >>> k = NumpyKernels()
        >>> frame = np.array([3, 3, 4, 9, 0, 0, 1], np.uint16)
        >>> cm = k.common_mode(frame, np.array([0, 0, 0, 0, 1, 1, 1], np.int32), 2, 0.0, 1.0, 5.0)
        >>> cm.median.tolist(), cm.offset.tolist()
        ([3.0, 0.0], [3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0])
        """
        lo, n_hist = _common_mode_range(below)
        v = photons(flat, offset, scale)
        with np.errstate(invalid="ignore"):
            ok = (panel >= 0) & (v < below) & (v >= -np.finfo(np.float64).max)
        ok &= np.arange(flat.size) % int(stride) == 0
        vo = v[ok]
        k = np.zeros(vo.size, np.int64)
        up = vo >= lo
        k[up] = np.minimum(np.floor((vo[up] - lo) * (n_hist / (below - lo))).astype(np.int64) + 1,
                           n_hist)
        cell = panel[ok].astype(np.int64) * (n_hist + 1) + k
        size = n_panels * (n_hist + 1)
        # four partial histograms (pixel index % 4) added in a fixed order, like the C kernel
        part = (np.flatnonzero(ok) // int(stride)) % 4
        sums = [np.bincount(cell[part == r], weights=vo[part == r], minlength=size)
                for r in range(4)]
        count = np.bincount(cell, minlength=size).reshape(n_panels, n_hist + 1)
        total = ((sums[0] + sums[1]) + (sums[2] + sums[3])).reshape(n_panels, n_hist + 1)
        cum = np.cumsum(count, axis=1)
        n = cum[:, -1]
        at = np.argmax(cum > ((n - 1) // 2)[:, None], axis=1)
        rows = np.arange(n_panels)
        median = np.where(n > 0, total[rows, at] / np.maximum(count[rows, at], 1), 0.0)
        if _table_ok(offset, scale, split, panel_table):
            table = _panel_table(median, float(offset), float(scale), SPLIT_OFFSET_BASE)
            if table is not None:
                return CommonMode(median=median,
                                  offset=PanelOffset(SPLIT_OFFSET_BASE, table, panel))
        base = np.broadcast_to(np.asarray(offset_values(offset), np.float64), flat.shape)
        sc = np.broadcast_to(np.asarray(scale, np.float64), flat.shape)
        shift = (panel >= 0) & (sc > 0)
        out = base.copy()
        out[shift] = base[shift] + median[panel[shift]] / sc[shift]
        out = out.astype(np.float32)
        if split:
            base = _split_base(offset)
            o64 = out.astype(np.float64)
            d = o64 - base
            if np.all((o64 == np.floor(o64)) & (d >= -32768) & (d <= 32767)):
                return CommonMode(median=median, offset=SplitOffset(base, d.astype(np.int16)))
        return CommonMode(median=median, offset=out)

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


#: Pixels per chunk of the C kernels' bin table (``lcls_kernels.h``).
CHUNK = 16


def bin_chunks(bins, panel=None):
    """Chunks of at most :data:`CHUNK` consecutive pixels sharing a bin (C bin table).

    Parameters
    ----------
    bins : ndarray of int32, (n,)
        Bin of each pixel, -1 for none.
    panel : ndarray of int32, (n,), optional
        Panel id of each pixel: chunks are also split where it changes (so that a chunk
        has one panel, for :class:`PanelOffset`).

    Returns
    -------
    start : ndarray of int32
        First pixel of each chunk (ascending).
    code : ndarray of uint32
        ``bin << 4 | (length - 1)``.

    Examples
    --------
    >>> s, c = bin_chunks(np.array([5] * 20 + [-1, 2], np.int32))
    >>> s.tolist(), (c >> 4).tolist(), ((c & 15) + 1).tolist()
    ([0, 16, 21], [5, 5, 2], [16, 4, 1])
    """
    bins = np.ascontiguousarray(bins, np.int32).reshape(-1)
    n = bins.size
    if n and int(bins.max()) >= 1 << 28:
        raise ValueError("the C kernels take at most 2**28 bins")
    step = bins[1:] != bins[:-1]
    if panel is not None:
        panel = np.asarray(panel).reshape(-1)
        if panel.shape != bins.shape:
            raise ValueError("panel must have one id per pixel")
        step |= panel[1:] != panel[:-1]
    change = np.flatnonzero(step) + 1
    starts = np.concatenate(([0], change)).astype(np.int64)
    ends = np.concatenate((change, [n])).astype(np.int64)
    keep = bins[starts] >= 0 if n else np.zeros(0, bool)
    starts, lengths = starts[keep], ends[keep] - starts[keep]
    per_run = (lengths + CHUNK - 1) // CHUNK
    run = np.repeat(np.arange(starts.size), per_run)
    k = np.arange(run.size) - np.repeat(np.cumsum(per_run) - per_run, per_run)
    start = starts[run] + k * CHUNK
    length = np.minimum(CHUNK, lengths[run] - k * CHUNK)
    code = (bins[start].astype(np.uint32) << 4) | (length - 1).astype(np.uint32)
    return np.ascontiguousarray(start, np.int32), np.ascontiguousarray(code, np.uint32)


def _common_mode_range(below):
    """(lo, n_hist) of the common-mode histogram below ``below``."""
    n_hist = int(round(COMMON_MODE_RANGE * COMMON_MODE_BINS_PER_PHOTON))
    return float(below) - COMMON_MODE_RANGE, n_hist


class _CWorkspace:
    """Bin chunks (precomputed once per geometry) and scratch buffers."""

    def __init__(self, bins, n_bins, panel=None):
        self.bins = bins  # the caller's array: identity check per call, no copy
        self.n_pixels, self.n_bins = int(np.size(bins)), n_bins
        self.chunk_start, self.chunk_code = bin_chunks(bins, panel)
        # PanelOffset support: panel index + 1 of every chunk and pixel
        self.panel = self.chunk_panel = self.pixel_panel = None
        if panel is not None:
            if np.size(panel) != self.n_pixels or (self.n_pixels and int(np.min(panel)) < -1):
                raise ValueError("panel must hold one id >= -1 per pixel")
            self.panel = panel
            self.pixel_panel = np.ascontiguousarray(np.asarray(panel).reshape(-1) + 1, np.int32)
            self.chunk_panel = np.ascontiguousarray(self.pixel_panel[self.chunk_start])
            self.table_size = int(self.pixel_panel.max(initial=0)) + 1
        self.sum = np.zeros(n_bins, np.float64)
        self.sumsq = np.zeros(n_bins, np.float64)
        self.excluded = np.zeros(n_bins, np.int32)
        self.binmax = np.zeros(n_bins, np.float64)
        self.work = np.zeros(4 * n_bins, np.int64)
        n = self.n_pixels
        cap = self.chunk_start.size + 1
        self.span_start = np.empty(cap, np.int32)
        self.span_len = np.empty(cap, np.int32)
        self.span_max = np.empty(cap, np.float64)
        self.span_bin = np.empty(cap, np.int32)
        self.visited = np.zeros(n, np.uint8)
        self.stack = np.empty(n + 1, np.int32)
        self.counts = np.zeros(3, np.int64)  # n_spans, n_lit, n_nonfinite
        self.out = np.zeros(4, np.float64)  # vmax | n_peaks, intensity, n_pixels


def _ptr(a):
    return None if a is None else a.ctypes.data


#: Frame dtypes of the C kernels' integer path (where a PanelOffset applies per chunk).
_INT16_CODES = (0, 1, 2, 3)


def _panel_args(offset, flat, scale, ws):
    """(offset, chunk_panel, pixel_panel, table): a :class:`PanelOffset` the C kernels can
    take per chunk (integer frame, scalar scale > 0, workspace built with its ``panel``)
    with its tables; any other offset as it is (a PanelOffset as its SplitOffset)."""
    if not isinstance(offset, PanelOffset):
        return offset, None, None, None
    p = offset.panel
    t = offset.table
    if (ws is not None and ws.panel is not None and DTYPE_CODES.get(flat.dtype) in _INT16_CODES
            and np.ndim(scale) == 0 and float(scale) > 0 and t.dtype == np.int16
            and t.flags.c_contiguous and (ws.panel is p or np.array_equal(ws.panel, p))
            and t.size >= ws.table_size):
        return float(offset.base), ws.chunk_panel, ws.pixel_panel, t
    return offset.split(), None, None, None


def _offset_args(offset, scale, n):
    """(offset_px, offset_d, offset, scale_px, scale): per-pixel arrays or None, scalars."""
    if isinstance(offset, SplitOffset):
        d = offset.delta
        if d.dtype != np.int16 or d.shape != (n,) or not d.flags.c_contiguous:
            raise ValueError("SplitOffset.delta must be C-contiguous int16 of the frame size")
        (sc_px, sc), = _offset_args_plain((scale,), n)
        return None, d, float(offset.base), sc_px, sc
    (off_px, off), (sc_px, sc) = _offset_args_plain((offset, scale), n)
    return off_px, None, off, sc_px, sc


def _offset_args_plain(values, n):
    """Split offset/scale into (per-pixel pointer or None, scalar) pairs."""
    args = []
    for x in values:
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
        lib.lcls_accumulate.argtypes = [P, I, I64, I64, P, P, ctypes.c_int32, P, P, P, P, P,
                                        D, D, D, D,
                                        P, P, P, P, P, P, P, P, P, P, P]
        lib.lcls_accumulate.restype = I
        lib.lcls_profile_accumulate.argtypes = [P, I, I64, I64, P, P, ctypes.c_int32, P, P, P,
                                                P, P, D, D, D, P, P, P, P]
        lib.lcls_profile_accumulate.restype = I
        lib.lcls_panel_common_mode.argtypes = [P, I, I64, P, ctypes.c_int32, P, I64, P, P, P,
                                               D, D, D, D, ctypes.c_int32, I64, P, P, P, P, P,
                                               D]
        lib.lcls_panel_common_mode.restype = I
        lib.lcls_simd_level.argtypes = [I]
        lib.lcls_simd_level.restype = I
        lib.lcls_find_peaks.argtypes = [P, I, I64, I64, I64, P, P, P, P, P, P, D, D, D, P, P, P, I,
                                        I64, I64, P, P, P, P, I64, P, P, P]
        lib.lcls_find_peaks.restype = I
        self.lib, self.path = lib, path

    def workspace(self, bins, n_bins, panel=None):
        """Bin chunks and scratch buffers; with ``panel`` (int32 ids, -1 none, the array
        :class:`PanelOffset` offsets will carry), chunks are split at panel changes."""
        return _CWorkspace(bins, n_bins, panel)

    def simd_level(self, max_level=None):
        """SIMD level of the uint16 paths: 0 scalar, 1 SSE2, 2 AVX2 (run-time detection).

        ``max_level`` caps it for this process (the tests run every path); returns the
        level in use.
        """
        return int(self.lib.lcls_simd_level(-1 if max_level is None else int(max_level)))

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
        offset, cp, _, pt = _panel_args(offset, flat, scale, ws)
        off_px, off_d, off, sc_px, sc = _offset_args(offset, scale, flat.size)
        rc = self.lib.lcls_accumulate(
            flat.ctypes.data, DTYPE_CODES[flat.dtype], flat.size, ws.chunk_start.size,
            ws.chunk_start.ctypes.data, ws.chunk_code.ctypes.data, n_bins,
            _ptr(off_px), _ptr(sc_px), _ptr(off_d), _ptr(cp), _ptr(pt), off, sc, float(hot),
            float(cand_thr),
            ws.sum.ctypes.data, ws.sumsq.ctypes.data, ws.excluded.ctypes.data,
            ws.binmax.ctypes.data, ws.work.ctypes.data,
            ws.span_start.ctypes.data, ws.span_len.ctypes.data, ws.span_max.ctypes.data,
            ws.span_bin.ctypes.data, ws.counts.ctypes.data, ws.out.ctypes.data)
        if rc != 0:
            raise ValueError(f"lcls_accumulate failed ({rc})")
        n_spans, n_lit, n_nonfinite = (int(x) for x in ws.counts)
        return Accumulation(sum=ws.sum, sumsq=ws.sumsq, excluded=ws.excluded, binmax=ws.binmax,
                            span_start=ws.span_start[:n_spans], span_len=ws.span_len[:n_spans],
                            span_max=ws.span_max[:n_spans], n_lit=n_lit,
                            vmax=float(ws.out[0]), n_nonfinite=n_nonfinite,
                            span_bin=ws.span_bin[:n_spans])

    def profile_accumulate(self, flat, bins, n_bins, offset, scale, hot, ws=None):
        if ws is None:
            ws = self.workspace(bins, n_bins)
        self._check(flat, bins, ws, n_bins)
        offset, cp, _, pt = _panel_args(offset, flat, scale, ws)
        off_px, off_d, off, sc_px, sc = _offset_args(offset, scale, flat.size)
        rc = self.lib.lcls_profile_accumulate(
            flat.ctypes.data, DTYPE_CODES[flat.dtype], flat.size, ws.chunk_start.size,
            ws.chunk_start.ctypes.data, ws.chunk_code.ctypes.data, n_bins,
            _ptr(off_px), _ptr(sc_px), _ptr(off_d), _ptr(cp), _ptr(pt), off, sc, float(hot),
            ws.sum.ctypes.data, ws.excluded.ctypes.data, ws.work.ctypes.data,
            ws.counts.ctypes.data)
        if rc != 0:
            raise ValueError(f"lcls_profile_accumulate failed ({rc})")
        return ProfileAccumulation(sum=ws.sum, excluded=ws.excluded,
                                   n_nonfinite=int(ws.counts[0]))

    def common_mode(self, flat, panel, n_panels, offset, scale, below, ws=None, stride=1,
                    split=False, panel_table=False):
        if int(stride) < 1:
            raise ValueError("stride must be >= 1")
        if flat.dtype not in DTYPE_CODES or not flat.flags.c_contiguous or flat.ndim != 1:
            raise ValueError("frame must be a flat C-contiguous array (see as_kernel_input)")
        if panel.dtype != np.int32 or panel.shape != flat.shape or not panel.flags.c_contiguous:
            raise ValueError("panel must be C-contiguous int32 of the frame size")
        runs = getattr(ws, "cm_runs", None)
        if getattr(ws, "cm_checked", None) is not panel or runs is None:  # once per panel array
            if panel.size and int(panel.max()) >= n_panels:
                raise ValueError("panel ids must be < n_panels")
            runs = _panel_runs(panel)
            if ws is not None:
                ws.cm_checked, ws.cm_runs = panel, runs
        lo, n_hist = _common_mode_range(below)
        cells = 4 * n_panels * (n_hist + 1)  # four partial histograms
        buf = getattr(ws, "cm", None)
        if buf is None or buf[0].size != cells or buf[3].size != flat.size:
            buf = (np.zeros(cells, np.int64), np.zeros(cells, np.float64),
                   np.zeros(n_panels, np.float64), np.empty(flat.size, np.float32),
                   np.empty(flat.size, np.int16))
            if ws is not None:
                ws.cm = buf
        count, total, median, out, out_d = buf
        off_px, off_d, off, sc_px, sc = _offset_args(offset, scale, flat.size)
        base = _split_base(offset)
        if _table_ok(offset, scale, split, panel_table):
            # medians only (no per-pixel output), then one offset per panel
            rc = self.lib.lcls_panel_common_mode(
                flat.ctypes.data, DTYPE_CODES[flat.dtype], flat.size, panel.ctypes.data,
                n_panels, runs.ctypes.data, runs.size - 1, None, None, None, off, sc,
                float(below), lo, n_hist, int(stride), count.ctypes.data, total.ctypes.data,
                median.ctypes.data, None, None, base)
            if rc < 0:
                raise ValueError(f"lcls_panel_common_mode failed ({rc})")
            table = _panel_table(median, off, sc, SPLIT_OFFSET_BASE)
            if table is not None:
                return CommonMode(median=median,
                                  offset=PanelOffset(SPLIT_OFFSET_BASE, table, panel))
        rc = self.lib.lcls_panel_common_mode(
            flat.ctypes.data, DTYPE_CODES[flat.dtype], flat.size, panel.ctypes.data, n_panels,
            runs.ctypes.data, runs.size - 1, _ptr(off_px), _ptr(sc_px), _ptr(off_d), off, sc,
            float(below), lo, n_hist, int(stride), count.ctypes.data, total.ctypes.data, median.ctypes.data,
            out.ctypes.data, out_d.ctypes.data if split else None, base)
        if rc < 0:
            raise ValueError(f"lcls_panel_common_mode failed ({rc})")
        if split and rc == 0:
            return CommonMode(median=median, offset=SplitOffset(base, out_d))
        return CommonMode(median=median, offset=out)

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
        span_bin = acc.span_bin
        if span_bin is not None and span_bin.base is not ws.span_bin:  # not from this workspace
            span_bin = np.ascontiguousarray(span_bin, np.int32)
            if span_bin.size != start.size or (span_bin.size and (
                    int(span_bin.min()) < 0 or int(span_bin.max()) >= ws.n_bins)):
                raise ValueError("span_bin must hold one bin (0 <= bin < n_bins) per span")
        offset, _, pp, pt = _panel_args(offset, flat, scale, ws)
        off_px, off_d, off, sc_px, sc = _offset_args(offset, scale, flat.size)
        rc = self.lib.lcls_find_peaks(
            flat.ctypes.data, DTYPE_CODES[flat.dtype], n_mod, ny, nx, bins.ctypes.data,
            _ptr(off_px), _ptr(sc_px), _ptr(off_d), _ptr(pp), _ptr(pt), off, sc, float(hot), thr.ctypes.data,
            bg.ctypes.data,
            _ptr(panel), int(connectivity), int(min_pix), int(max_pix),
            start.ctypes.data, length.ctypes.data, vmax.ctypes.data, _ptr(span_bin),
            start.size, ws.visited.ctypes.data,
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
