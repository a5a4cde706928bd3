"""Per-frame preprocessing: radial profile, polar image, hit-finding scalars.

Everything a model sees of a detector frame is computed here, the same way at ingest and
at predict time (the parameters are stored in ``manifest.json`` and ``model.json``):

1. **Photons**: ``v = (raw - pedestal - dark) / (adu_per_photon * gain)`` for every pixel
   that the mask keeps and whose momentum transfer q lies in ``[q_min, q_max)``. Pixels
   above ``hot_pixel_photons`` are excluded from this frame; non-finite values in such
   pixels raise :class:`~lcls_dl.errors.InputError`. With ``common_mode="panel-median"``
   each panel's common mode (median of its unmasked pixels below
   ``common_mode_below`` photons, this frame, from every :data:`COMMON_MODE_STRIDE`-th
   pixel) is subtracted from its pixels first. Integral offsets (an integral dark,
   whole-ADU common modes) reach the kernels as int16 ADU: integer frames stay exact.
2. **Fused accumulation** (one pass, C kernel): per (q, phi) bin the sum and the sum of
   squares of ``v``; the largest pixel; candidate peak pixels.
3. **Radial profile** ``I(q)``: mean photons per pixel in each of ``n_q`` q bins (the same
   as pyFAI's ``integrate1d`` without solid-angle or polarization correction and without
   pixel splitting).
4. **Polar image** ``(n_q_img, n_phi, image_channels)``; rows are q (ascending), columns
   azimuth phi in ``[-pi, pi)``. Channel 0 (``mean``): mean photons per (q, phi) bin.
   Channel 1 (``max_snr``, when ``image_channels == 2``): the largest local signal-to-noise
   ratio of any pixel of the bin, ``z = x / sqrt(sigma_q**2 + max(x, 0) + snr_sigma_floor**2)``
   with ``x = v - mean_q`` and mean and sigma of the pixel's profile q bin (the peak
   finder's statistics). The ``max(x, 0)`` term is the Poisson variance of the excess
   itself: without it, on sparse frames (0.05-1 photon/pixel) single 3-9 photon pixels of
   pure water reach 8-10 "sigma" in some bin of every frame; with it, water stays below ~4.5
   while visible spots reach 5-100 (and ``z`` scales as ``sqrt(a)`` when the photons scale
   by ``a``, photon-limited case). ``z`` is monotonic in ``v``: a 4-25 px Bragg
   spot is averaged away among the ~100-200 pixels of a polar bin in channel 0, but its
   brightest pixel survives here. It is computed from the per-bin maximum of the same fused
   pass (no extra pass over the frame). Bins no pixel covers are filled by linear
   interpolation along phi (circularly) from the nearest covered bins of the same row, rows
   with no covered bin are 0. Geometry independent: rings are horizontal lines, Bragg spots
   blobs. With ``image_channels == 1`` (datasets from before the max-SNR channel) the image
   is 2-D ``(n_q_img, n_phi)``, channel 0 only.
5. **Peaks** (in the spirit of peakfinder8): a pixel is a peak pixel when
   ``v > max(peak_min_photons, mean_q + peak_min_snr * sigma_q)`` with mean and sigma of
   its q bin from step 2; connected groups of peak pixels (``peak_connectivity`` 4 or 8,
   never across detector modules/panels) count as a peak when they have
   ``peak_min_pixels..peak_max_pixels`` pixels.
6. **Intensity transform** of image and profile (see :data:`TRANSFORMS`): both are divided
   by the frame's mean photons per pixel in ``[q_min, q_max)`` (floored at ``norm_floor``)
   and then compressed (``asinh`` by default), so weak and strong hits look alike to a
   network; the absolute scale is kept in the scalars. The max-SNR channel is already
   dimensionless: it gets the same compression without the division (``none``: raw SNR).
7. **Scalars** (:data:`SCALAR_NAMES`): peak count and intensity, total and ring
   intensities, the S2/S1 ring ratio, the S1 peak position, the largest pixel and the
   lit-pixel fraction; with ``image_channels == 2`` also :data:`SNR_SCALAR_NAMES`, the
   largest local SNR and the number of bins holding a pixel above ``snr_count_min`` (a
   peak count that no size limit can miss).

Examples
--------
>>> import numpy as np
>>> y, x = np.mgrid[:64, :64] - 31.5
>>> q_map = np.hypot(x, y) / 10.0
>>> phi_map = np.arctan2(y, x)
>>> params = PreprocessParams(q_min=0.5, q_max=3.0, n_q=16, image_shape=(16, 32))
>>> pre = FramePreprocessor(q_map, phi_map, None, params)
>>> out = pre(np.ones((64, 64), np.uint16))
>>> out["image"].shape, out["profile"].shape, out["scalars"].shape == (len(pre.scalar_names),)
((16, 32, 2), (16,), True)
"""
from dataclasses import asdict, dataclass, fields

import numpy as np

from lcls_dl.errors import ConfigError, InputError
from lcls_dl.ingest.kernels import as_kernel_input, get_kernels, split_offset

#: Pixels of the per-panel common mode's histogram: every COMMON_MODE_STRIDE-th pixel of
#: the frame (flat index), always the same ones (see
#: :meth:`~lcls_dl.ingest.kernels.NumpyKernels.common_mode`).
COMMON_MODE_STRIDE = 4

#: Frame dtypes for which an integral dark frame is passed to the kernels as int16 ADU
#: (:class:`~lcls_dl.ingest.kernels.SplitOffset`): the C kernels' exact integer path.
_INT_FRAME_DTYPES = frozenset(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16))

#: Intensity transforms of image and profile, ``x`` = intensity / (frame mean * transform_scale).
TRANSFORMS = {
    "asinh": np.arcsinh,  # ~linear near 0, logarithmic for bright spots, accepts negatives
    "log1p": lambda x: np.log1p(np.maximum(x, 0.0)),
    "linear": lambda x: x,  # normalized, not compressed
    "none": None,  # raw mean photons per pixel (no normalization)
}

#: Names of the per-frame scalar features, in the order of ``scalars``.
SCALAR_NAMES = (
    "n_peaks",               # counted peaks
    "log10_peak_photons",    # log10(1 + background-subtracted photons in counted peaks)
    "log10_total_photons",   # log10(1 + photons in [q_min, q_max))
    "log10_mean_photons",    # log10(mean photons per pixel in [q_min, q_max) + 1e-4)
    "log10_ring_mean",       # log10(mean photons per pixel in the S1 window + 1e-4)
    "ring_ratio",            # mean in the S2 window / mean in the S1 window (0 if S1 <= 0)
    "s1_peak_q",             # q of the profile maximum in the S1 window (1/A)
    "log10_max_pixel",       # log10(1 + largest pixel, photons)
    "lit_fraction",          # fraction of pixels above peak_min_photons
)

#: Extra scalars of 2-channel preprocessing (``image_channels == 2``), after SCALAR_NAMES.
SNR_SCALAR_NAMES = (
    "log10_max_snr",         # log10(1 + max(0, largest local SNR of any pixel))
    "n_snr_bins",            # fine (q, phi) bins whose max local SNR exceeds snr_count_min
)

#: Per-frame common-mode corrections (:attr:`PreprocessParams.common_mode`).
COMMON_MODES = ("none", "panel-median")

#: Names of the polar image channels (``image[..., c]``), for ``image_channels`` = 2.
IMAGE_CHANNELS = ("mean", "max_snr")


@dataclass
class PreprocessParams:
    """Preprocessing parameters (JSON round trip through :meth:`to_dict`/:meth:`from_dict`).

    Parameters
    ----------
    q_min, q_max : float
        Momentum-transfer range, 1/angstrom. Pixels outside are ignored everywhere.
    n_q : int
        Radial profile bins (uniform in q).
    image_shape : (int, int)
        Polar image ``(n_q_img, n_phi)``; ``n_q`` and ``n_q_img`` must divide one another.
    adu_per_photon : float
        Detector gain; 1 when frames are already photons.
    pedestal : float or None
        ADU subtracted from every pixel before the gain (a per-pixel dark frame is an
        argument of :class:`FramePreprocessor`).
    hot_pixel_photons : float or None
        Pixels above this many photons are excluded from the frame (None: no limit).
    peak_min_photons : float
        Absolute peak threshold (photons), like peakfinder8's ``adc_threshold``.
    peak_min_snr : float
        Peak threshold above the q bin's mean in units of its standard deviation. The
        defaults (4 sigma, >= 3 connected pixels) were chosen on a simulated CSPAD run
        (1,200 frames, ice-strength 10-3000): with 6 sigma / 2 pixels, 15 % of ice frames
        (spots of peak SNR 2-10) had no peak; with 4 / 3, 10 %, while 94 % of water frames
        still have none (35 of 604 have 1, one has 3).
    peak_min_pixels, peak_max_pixels : int
        Size range (pixels) of a counted peak. Single-shot ice spots are 4-25 px at half
        maximum but, thresholded at ``peak_min_snr`` on a weak ring, strong spots and
        streaks cover hundreds of pixels: the default upper bound (5000) only rejects
        region-sized artefacts.
    peak_connectivity : {4, 8}
    transform : str
        One of :data:`TRANSFORMS`.
    transform_scale : float
        Divides the normalized intensity before the transform.
    norm_floor : float
        Lower bound (photons per pixel) of the normalization, so that blank frames are
        not amplified into noise.
    s1_window, s2_window : (float, float)
        q windows (1/angstrom) of the water rings S1 and S2 used by the scalars.
    image_channels : {1, 2}
        1: the polar image is 2-D, mean photons only; 2: ``(H, W, 2)`` with the max-SNR
        channel (:data:`IMAGE_CHANNELS`). :meth:`from_dict` reads a block without this key
        (written before the channel existed) as 1.
    snr_sigma_floor : float
        Added (in quadrature, photons) to the noise of the max-SNR channel, so that a
        blank frame (sigma ~ 0) does not divide by zero.
    snr_count_min : float
        Local SNR above which a bin counts in the ``n_snr_bins`` scalar.
    common_mode : {"none", "panel-median"}
        Per-frame baseline correction: ``panel-median`` subtracts from every panel (the
        ``panel_ids`` of :class:`FramePreprocessor`, else the modules of a 3-D stack, else
        the whole frame) the median of its unmasked pixels below ``common_mode_below``
        photons (the pixels without a photon), computed from a 1/128-photon histogram
        of every :data:`COMMON_MODE_STRIDE`-th pixel (a fixed quarter of each panel: the
        median moves by < 0.01 photon;
        :meth:`~lcls_dl.ingest.kernels.NumpyKernels.common_mode`).
    common_mode_below : float
        Photon limit of the pixels the common mode is taken from.
    dark_file, gain_file : str, optional
        Absolute paths of a per-pixel dark (ADU, subtracted after ``pedestal``) and relative
        gain (``.npy`` or HDF5), recorded so that predict applies the same calibration. The
        arrays reach :class:`FramePreprocessor` as its ``dark``/``gain`` arguments
        (:func:`lcls_dl.ingest.pipeline.make_preprocessor` loads them).
    """

    q_min: float = 0.5
    q_max: float = 3.5
    n_q: int = 128
    image_shape: tuple = (128, 128)
    adu_per_photon: float = 1.0
    pedestal: float = None
    hot_pixel_photons: float = None
    peak_min_photons: float = 5.0
    peak_min_snr: float = 4.0
    peak_min_pixels: int = 3
    peak_max_pixels: int = 5000
    peak_connectivity: int = 8
    transform: str = "asinh"
    transform_scale: float = 1.0
    norm_floor: float = 0.05
    s1_window: tuple = (1.5, 2.1)
    s2_window: tuple = (2.6, 3.2)
    image_channels: int = 2
    snr_sigma_floor: float = 0.2
    snr_count_min: float = 5.0
    common_mode: str = "none"
    common_mode_below: float = 0.5
    dark_file: str = None
    gain_file: str = None

    def __post_init__(self):
        self.image_shape = tuple(int(x) for x in self.image_shape)
        self.s1_window = tuple(float(x) for x in self.s1_window)
        self.s2_window = tuple(float(x) for x in self.s2_window)
        self.n_q = int(self.n_q)
        self.image_channels = int(self.image_channels)
        n_img = self.image_shape[0]
        if not 0 <= self.q_min < self.q_max:
            raise ConfigError(f"need 0 <= q_min < q_max, got {self.q_min}, {self.q_max}", "preprocessing")
        if self.n_q < 1 or min(self.image_shape) < 1 or len(self.image_shape) != 2:
            raise ConfigError(f"bad n_q/image_shape {self.n_q}, {self.image_shape}", "preprocessing")
        if max(self.n_q, n_img) % min(self.n_q, n_img):
            raise ConfigError(f"n_q ({self.n_q}) and image rows ({n_img}) must divide one another",
                              "preprocessing")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"unknown transform {self.transform!r} (one of {', '.join(TRANSFORMS)})",
                              "preprocessing")
        if self.image_channels not in (1, 2):
            raise ConfigError(f"image_channels must be 1 or 2, got {self.image_channels}",
                              "preprocessing")
        if not self.snr_sigma_floor > 0:
            raise ConfigError("snr_sigma_floor must be > 0", "preprocessing")
        if self.peak_connectivity not in (4, 8):
            raise ConfigError("peak_connectivity must be 4 or 8", "preprocessing")
        if not self.adu_per_photon > 0:
            raise ConfigError("adu_per_photon must be > 0", "preprocessing")
        if self.common_mode not in COMMON_MODES:
            raise ConfigError(f"unknown common_mode {self.common_mode!r} (one of "
                              f"{', '.join(COMMON_MODES)})", "preprocessing")
        self.common_mode_below = float(self.common_mode_below)
        if not np.isfinite(self.common_mode_below):
            raise ConfigError("common_mode_below must be finite", "preprocessing")

    def q_edges(self):
        """Edges of the ``n_q`` profile bins, float64, (n_q + 1,), 1/angstrom."""
        return np.linspace(self.q_min, self.q_max, self.n_q + 1)

    def q_centers(self):
        """Centres of the profile bins, (n_q,)."""
        e = self.q_edges()
        return 0.5 * (e[1:] + e[:-1])

    def to_dict(self):
        """JSON-able dict (tuples become lists)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict`; extra keys (``scalar_names``, ``q_edges``) are ignored.

        A block without ``image_channels`` (written before the max-SNR channel existed)
        means 1 channel, so old datasets and models keep their 2-D image.
        """
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("image_channels", 1)
        return cls(**kw)

    @property
    def image_array_shape(self):
        """Per-frame shape of ``image``: ``(H, W)`` (1 channel) or ``(H, W, 2)``."""
        if self.image_channels == 1:
            return tuple(self.image_shape)
        return tuple(self.image_shape) + (self.image_channels,)


def _fill_plan(covered):
    """Interpolation plan for empty polar bins: (targets, left, right, w_right) flat indices.

    Each empty bin of a row takes ``(1 - w) * left + w * right`` of the nearest covered bins
    on both sides along phi (wrapping around); rows with no covered bin stay 0.
    """
    n_rows, n_phi = covered.shape
    targets, left, right, w = [], [], [], []
    cols = np.arange(n_phi)
    for r in range(n_rows):
        good = np.flatnonzero(covered[r])
        if good.size == 0 or good.size == n_phi:
            continue
        empty = np.flatnonzero(~covered[r])
        k = np.searchsorted(good, empty)
        lo = good[(k - 1) % good.size]
        hi = good[k % good.size]
        dist_lo = (empty - lo) % n_phi
        dist_hi = (hi - empty) % n_phi
        targets.append(r * n_phi + cols[empty])
        left.append(r * n_phi + lo)
        right.append(r * n_phi + hi)
        w.append(dist_lo / (dist_lo + dist_hi))
    if not targets:
        e = np.zeros(0, np.intp)
        return e, e, e, np.zeros(0)
    return (np.concatenate(targets), np.concatenate(left), np.concatenate(right),
            np.concatenate(w))


class FramePreprocessor:
    """Turn raw frames of one detector geometry into image, profile and scalars.

    Bin indices are computed once here; each call makes one fused pass over the frame
    (plus a local flood fill around peak candidates). Not thread safe (scratch buffers are
    reused): use one instance per thread.

    Parameters
    ----------
    q_map, phi_map : ndarray, frame_shape
        Momentum transfer (1/angstrom) and azimuth (rad) of every pixel, e.g.
        ``DetectorGeometry.q_map()`` / ``phi_map()``. 2-D slabs or 3-D module stacks.
    mask : ndarray of bool, frame_shape, or None
        True = good pixel.
    params : PreprocessParams
    dark : ndarray, frame_shape, optional
        Per-pixel dark (ADU), subtracted after ``params.pedestal``. When ``dark + pedestal``
        is integral (a rounded dark) and there is no gain map, integer frames are
        corrected in integer arithmetic (exact, the same photon values; half the memory
        traffic of a float offset): round a fractional dark before passing it to get that
        speed (the rounding moves pixels by at most 0.5 ADU).
    gain : ndarray, frame_shape, optional
        Per-pixel relative gain: photons = ADU / (adu_per_photon * gain).
    panel_ids : ndarray of int, frame_shape, optional
        Peaks never connect pixels of different ids (e.g. ASICs of a 2-D CSPAD slab).
        Modules of a 3-D stack are always separate.
    kernels : str or kernels object, optional
        ``"c"``, ``"numpy"``, ``"auto"`` (default: :func:`~lcls_dl.ingest.kernels.get_kernels`).
    """

    def __init__(self, q_map, phi_map, mask, params, dark=None, gain=None, panel_ids=None,
                 kernels=None):
        q_map = np.asarray(q_map, np.float64)
        phi_map = np.asarray(phi_map, np.float64)
        if q_map.ndim not in (2, 3) or phi_map.shape != q_map.shape:
            raise InputError(f"q_map {q_map.shape} and phi_map {phi_map.shape} must be the same "
                             "2-D or 3-D shape", "geometry")
        self.frame_shape = q_map.shape
        self.params = p = params
        if mask is None:
            mask = np.ones(self.frame_shape, bool)
        mask = np.asarray(mask)
        if mask.shape != self.frame_shape:
            raise InputError(f"mask shape {mask.shape} does not match frame shape {self.frame_shape}",
                             "mask")
        self.kernels = get_kernels(kernels) if kernels is None or isinstance(kernels, str) else kernels
        n_img, n_phi = p.image_shape
        self.n_fine = max(p.n_q, n_img)
        self.n_phi = n_phi
        self.n_bins = self.n_fine * n_phi

        # fine (q, phi) bin of every pixel; the profile and image rows are unions of fine rows
        with np.errstate(invalid="ignore"):
            qf = np.floor((q_map - p.q_min) / (p.q_max - p.q_min) * self.n_fine)
            pf = np.floor((phi_map + np.pi) / (2 * np.pi) * n_phi)
            ok = mask.astype(bool) & np.isfinite(qf) & np.isfinite(pf) & (qf >= 0) & (qf < self.n_fine)
        pf = np.clip(np.nan_to_num(pf), 0, n_phi - 1)
        bins = np.where(ok, np.nan_to_num(qf) * n_phi + pf, -1)
        self.bins = np.ascontiguousarray(bins.astype(np.int32).reshape(-1))
        self.static_counts = np.bincount(self.bins[self.bins >= 0], minlength=self.n_bins)
        self.n_pixels_used = int(self.static_counts.sum())

        self.q_group = self.n_fine // p.n_q      # fine rows per profile bin
        self.img_group = self.n_fine // n_img    # fine rows per image row
        centers = p.q_centers()
        self._s1 = (centers >= p.s1_window[0]) & (centers < p.s1_window[1])
        self._s2 = (centers >= p.s2_window[0]) & (centers < p.s2_window[1])

        self._centers = centers
        self._static_radial = self._to_radial(self.static_counts)
        self._static_image = self._to_image(self.static_counts)
        self._static_covered = self._static_image > 0
        self._fill = _fill_plan(self._static_covered)
        # counts floored at 1: x / count is then x where covered and 0 / 1 = 0 elsewhere
        # (no pixel, so the sum is 0), the same as a division restricted to covered bins
        self._static_radial_1 = np.maximum(self._static_radial, 1)
        self._static_image_1 = np.maximum(self._static_image, 1)

        # ADU -> photons: v = (raw - offset) * scale, scalars or per-pixel float32
        pedestal = 0.0 if p.pedestal is None else float(p.pedestal)
        self.offset = pedestal
        self._offset_int = None
        self.scale = 1.0 / float(p.adu_per_photon)
        if dark is not None:
            dark = np.asarray(dark, np.float64)
            if dark.shape != self.frame_shape:
                raise InputError(f"dark shape {dark.shape} does not match frame shape {self.frame_shape}",
                                 "dark")
            self.offset = np.ascontiguousarray((dark + pedestal).astype(np.float32).reshape(-1))
            if gain is None:  # integral dark: int16 deltas (None if not integral)
                self._offset_int = split_offset(self.offset)
        if gain is not None:
            gain = np.asarray(gain, np.float64)
            if gain.shape != self.frame_shape:
                raise InputError(f"gain shape {gain.shape} does not match frame shape {self.frame_shape}",
                                 "gain")
            with np.errstate(divide="ignore"):
                sc = np.where(gain > 0, 1.0 / (p.adu_per_photon * gain), 0.0)
            self.scale = np.ascontiguousarray(sc.astype(np.float32).reshape(-1))
        self.hot = np.inf if p.hot_pixel_photons is None else float(p.hot_pixel_photons)

        shape3 = self.frame_shape if len(self.frame_shape) == 3 else (1,) + self.frame_shape
        self.block_shape = tuple(int(x) for x in shape3)
        self.panel_ids = None
        if panel_ids is not None:
            panel_ids = np.asarray(panel_ids)
            if panel_ids.shape != self.frame_shape:
                raise InputError(f"panel_ids shape {panel_ids.shape} does not match frame shape "
                                 f"{self.frame_shape}", "geometry")
            self.panel_ids = np.ascontiguousarray(panel_ids.astype(np.int32).reshape(-1))
        self._profile_bins = self._profile_ws = None
        self._cm_panel = None
        if p.common_mode == "panel-median":
            # panel of every unmasked pixel (ids made 0..n-1), -1 for the others
            if self.panel_ids is not None:
                ids = self.panel_ids
            else:  # modules of a 3-D stack, or the whole frame
                ids = np.repeat(np.arange(self.block_shape[0], dtype=np.int32),
                                self.block_shape[1] * self.block_shape[2])
            good = mask.astype(bool).reshape(-1) & (ids >= 0)
            uniq, inv = np.unique(ids[good], return_inverse=True)
            self._cm_panel = np.full(ids.size, -1, np.int32)
            self._cm_panel[good] = inv.astype(np.int32)
            self._cm_n = max(int(uniq.size), 1)
        # with common mode, chunks of the C kernels never straddle panels: the per-panel
        # corrections are applied per chunk (PanelOffset), no per-pixel offset array
        self._ws = self.kernels.workspace(self.bins, self.n_bins, panel=self._cm_panel)

    # ------------------------------------------------------------------ helpers
    @property
    def scalar_names(self):
        """Names of the scalar features (:data:`SCALAR_NAMES`, plus :data:`SNR_SCALAR_NAMES`
        with ``image_channels == 2``)."""
        extra = SNR_SCALAR_NAMES if self.params.image_channels == 2 else ()
        return list(SCALAR_NAMES) + list(extra)

    @property
    def profile_bin(self):
        """Profile bin of every pixel (int32, frame_shape), -1 masked or outside q range."""
        rb = np.where(self.bins >= 0, self.bins // self.n_phi // self.q_group, -1)
        return rb.astype(np.int32).reshape(self.frame_shape)

    @property
    def image_bin(self):
        """Flat polar-image bin of every pixel (int32, frame_shape), -1 masked or outside."""
        row = self.bins // self.n_phi // self.img_group
        ib = np.where(self.bins >= 0, row * self.n_phi + self.bins % self.n_phi, -1)
        return ib.astype(np.int32).reshape(self.frame_shape)

    def _to_radial(self, per_bin):
        return per_bin.reshape(self.params.n_q, self.q_group * self.n_phi).sum(axis=1)

    def _to_image(self, per_bin, reduce="sum"):
        n_img = self.params.image_shape[0]
        if self.img_group == 1:
            return per_bin.reshape(n_img, self.n_phi)
        grouped = per_bin.reshape(n_img, self.img_group, self.n_phi)
        return grouped.max(axis=1) if reduce == "max" else grouped.sum(axis=1)

    def _per_bin(self, radial):
        """Expand a per-profile-bin array to the fine bins (they are ordered by q row)."""
        return np.repeat(radial, self.q_group * self.n_phi)

    def _prepare(self, frame, where):
        a = np.asarray(frame)
        if a.shape != self.frame_shape:
            raise InputError(f"frame shape {a.shape} does not match geometry shape {self.frame_shape}",
                             where)
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or np.iscomplexobj(a):
            raise InputError(f"frame dtype {a.dtype} is not a real number type", where)
        return as_kernel_input(a)

    def _frame_offset(self, flat):
        """ADU offset of this frame: the static one, plus the common mode when enabled.

        For integer frames (8/16 bit) with a scalar scale the offset is integer ADU
        (:class:`~lcls_dl.ingest.kernels.SplitOffset`) where it can be: an integral dark,
        and common-mode offsets that are whole ADU (integer frames: the median is one ADU
        value). Without a per-pixel dark the common mode comes as a
        :class:`~lcls_dl.ingest.kernels.PanelOffset` (one integer per panel, applied per
        chunk by the C kernels: no per-pixel offset array is filled or read).
        """
        int_frame = flat.dtype in _INT_FRAME_DTYPES and np.ndim(self.scale) == 0
        static = self._offset_int if int_frame and self._offset_int is not None else self.offset
        if self._cm_panel is None:
            return static
        return self.kernels.common_mode(flat, self._cm_panel, self._cm_n, static, self.scale,
                                        self.params.common_mode_below, self._ws,
                                        stride=COMMON_MODE_STRIDE, split=int_frame,
                                        panel_table=True).offset

    def _accumulate(self, frame, where):
        """Fused pass over the fine bins; refuses non-finite used pixels."""
        flat = self._prepare(frame, where)
        offset = self._frame_offset(flat)
        acc = self.kernels.accumulate(flat, self.bins, self.n_bins, offset, self.scale, self.hot,
                                      self.params.peak_min_photons, self._ws)
        if acc.n_nonfinite:
            raise InputError(f"frame has {acc.n_nonfinite} non-finite pixels", where)
        counts = self.static_counts - acc.excluded if acc.excluded.any() else None
        return flat, offset, acc, counts

    def _radial_counts(self, counts):
        return self._static_radial if counts is None else self._to_radial(counts)

    # ------------------------------------------------------------------ API
    def profile(self, frame, where=None):
        """Radial profile only: mean photons per q bin, float64 (n_q,), 0 where empty.

        The same pixels as :meth:`__call__` (same masking, hot-pixel and non-finite
        handling) summed by the profile-only kernel
        (:meth:`~lcls_dl.ingest.kernels.NumpyKernels.profile_accumulate`) over the
        profile's q bins: no squares, maxima or peak candidates, longer chunks of equal
        bins. No peak finding, no transform.
        """
        flat = self._prepare(frame, where)
        if self._profile_ws is None:  # built on first use: __call__ never needs it
            self._profile_bins = self.profile_bin.reshape(-1)
            self._profile_ws = self.kernels.workspace(self._profile_bins, self.params.n_q,
                                                      panel=self._cm_panel)
        acc = self.kernels.profile_accumulate(flat, self._profile_bins, self.params.n_q,
                                              self._frame_offset(flat), self.scale, self.hot,
                                              self._profile_ws)
        if acc.n_nonfinite:
            raise InputError(f"frame has {acc.n_nonfinite} non-finite pixels", where)
        s, c = acc.sum, self._static_radial - acc.excluded
        return np.divide(s, c, out=np.zeros_like(s, dtype=np.float64), where=c > 0)

    def __call__(self, frame, where=None):
        """Preprocess one frame.

        Parameters
        ----------
        frame : ndarray, frame_shape
            Raw frame (ADU or photons), any real dtype.
        where : str, optional
            Location for error messages (``file:event``).

        Returns
        -------
        dict
            ``image`` float32 (n_q_img, n_phi, 2) -- or (n_q_img, n_phi) when
            ``image_channels == 1`` --, ``profile`` float32 (n_q,),
            ``scalars`` float32 (len(scalar_names),).

        Raises
        ------
        InputError
            Wrong shape or dtype, or non-finite values in used pixels.
        """
        p = self.params
        flat, offset, acc, counts = self._accumulate(frame, where)

        # radial statistics -> per-bin peak thresholds (bins without pixels: sums 0, mean 0)
        rs, rq, rc = self._to_radial(acc.sum), self._to_radial(acc.sumsq), self._radial_counts(counts)
        used = rc > 0
        rc1 = self._static_radial_1 if counts is None else np.maximum(rc, 1)
        mean = rs / rc1
        var = rq / rc1
        var -= mean * mean
        sigma = np.sqrt(np.maximum(var, 0.0, out=var), out=var)
        thr = np.where(used, np.maximum(p.peak_min_photons, mean + p.peak_min_snr * sigma), np.inf)
        n_peaks, peak_photons, _ = self.kernels.find_peaks(
            flat, self.block_shape, self.bins, offset, self.scale, self.hot,
            self._per_bin(thr), self._per_bin(mean), self.panel_ids,
            p.peak_connectivity, p.peak_min_pixels, p.peak_max_pixels, acc, self._ws)

        # polar image: mean per (q, phi) bin, empty bins interpolated along phi
        isum = self._to_image(acc.sum)
        if counts is None:
            icnt1, covered, (t, lo, hi, w) = self._static_image_1, self._static_covered, self._fill
        else:
            icnt = self._to_image(counts)
            icnt1 = np.maximum(icnt, 1)
            covered = icnt > 0
            if np.array_equal(covered, self._static_covered):
                t, lo, hi, w = self._fill
            else:  # hot or non-finite pixels emptied a bin in this frame
                t, lo, hi, w = _fill_plan(covered)
        image = isum / icnt1
        flat_img = image.reshape(-1)
        flat_img[t] = (1.0 - w) * flat_img[lo] + w * flat_img[hi]
        snr = None
        if p.image_channels == 2:
            # max local SNR per bin from the per-bin max (monotonic in the pixel value)
            # (profile bin, fine bins of it) view: broadcast the q-bin statistics
            x = acc.binmax.reshape(p.n_q, -1) - mean[:, None]
            var = (sigma * sigma + p.snr_sigma_floor ** 2)[:, None]
            noise = np.maximum(x, 0.0)
            noise += var
            with np.errstate(invalid="ignore"):
                fine = np.divide(x, np.sqrt(noise, out=noise), out=x).reshape(-1)
            fine[~np.isfinite(fine)] = -np.inf  # bins without an included pixel
            max_snr = max(float(fine.max()), 0.0)
            n_snr_bins = int(np.count_nonzero(fine > p.snr_count_min))
            snr = self._to_image(fine, reduce="max")
            snr = np.where(covered & np.isfinite(snr), snr, 0.0)
            flat_snr = snr.reshape(-1)
            flat_snr[t] = (1.0 - w) * flat_snr[lo] + w * flat_snr[hi]

        total = float(rs.sum())
        n_used = int(rc.sum())
        frame_mean = total / n_used if n_used else 0.0
        transform = TRANSFORMS[p.transform]
        image = image.astype(np.float32)
        profile = mean.astype(np.float32)
        if transform is not None:
            inv = np.float32(1.0 / (max(frame_mean, p.norm_floor) * p.transform_scale))
            image *= inv
            profile *= inv
            image, profile = transform(image), transform(profile)
        if snr is not None:
            snr = snr.astype(np.float32)
            image = np.stack([image, snr if transform is None else transform(snr)], axis=-1)

        s1 = self._window_mean(rs, rc, self._s1)
        s2 = self._window_mean(rs, rc, self._s2)
        s1_used = used & self._s1
        s1_q = float(self._centers[np.argmax(np.where(s1_used, mean, -np.inf))]) if s1_used.any() else 0.0
        scalars = np.array([
            n_peaks,
            np.log10(1.0 + max(peak_photons, 0.0)),
            np.log10(1.0 + max(total, 0.0)),
            np.log10(max(frame_mean, 0.0) + 1e-4),
            np.log10(max(s1, 0.0) + 1e-4),
            s2 / s1 if s1 > 0 else 0.0,
            s1_q,
            np.log10(1.0 + max(acc.vmax, 0.0)) if np.isfinite(acc.vmax) else 0.0,
            acc.n_lit / n_used if n_used else 0.0,
        ] + ([np.log10(1.0 + max(max_snr, 0.0)), n_snr_bins] if snr is not None else []),
            np.float32)
        return {"image": image.astype(np.float32, copy=False),
                "profile": profile.astype(np.float32, copy=False), "scalars": scalars}

    @staticmethod
    def _window_mean(rs, rc, sel):
        c = rc[sel].sum()
        return float(rs[sel].sum() / c) if c > 0 else 0.0

    def batch(self, frames, where=None):
        """Preprocess a stack of frames (k, *frame_shape).

        Parameters
        ----------
        frames : ndarray
        where : sequence of str, optional
            Per-frame locations for error messages.

        Returns
        -------
        dict
            ``image`` (k, n_q_img, n_phi[, 2]), ``profile`` (k, n_q), ``scalars`` (k, S), float32.
        """
        frames = np.asarray(frames)
        if frames.shape[1:] != self.frame_shape:
            raise InputError(f"frames shape {frames.shape[1:]} does not match geometry shape "
                             f"{self.frame_shape}", None if where is None else where[0])
        k = frames.shape[0]
        out = {"image": np.zeros((k,) + self.params.image_array_shape, np.float32),
               "profile": np.zeros((k, self.params.n_q), np.float32),
               "scalars": np.zeros((k, len(self.scalar_names)), np.float32)}
        for i in range(k):
            r = self(frames[i], None if where is None else where[i])
            for key in out:
                out[key][i] = r[key]
        return out
