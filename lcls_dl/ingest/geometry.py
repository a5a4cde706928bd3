"""Detector geometry: where every stored pixel sits in the lab, and maps derived from it.

A :class:`DetectorGeometry` describes frames *as stored* (``frame_shape``: a 2-D slab such as
CSPAD's 1480x1552 Cheetah raw layout, or a 3-D module stack such as psana's (32, 185, 388))
as a list of flat rectangular :class:`Panel` s. Each panel maps a pixel block
``[module, ss0:ss1, fs0:fs1]`` to lab coordinates (metres):

    xyz(ss, fs) = corner + (ss - ss0) * ss_vec + (fs - fs0) * fs_vec,   z += distance

with ``x`` horizontal, ``y`` vertical and ``z`` along the beam, the interaction point at the
origin. ``corner`` is the centre of pixel ``(ss0, fs0)``.

Derived maps (``q_map``, ``phi_map``, ``two_theta``, ``solid_angle``, ``polarization``) are
computed once per geometry and cached, so calling them per frame costs nothing.

Examples
--------
>>> g = cspad()
>>> g.frame_shape
(1480, 1552)
>>> round(float(g.wavelength), 3)
1.323
>>> q = g.q_map()            # (1480, 1552) float64, 1/angstrom
"""
import dataclasses
import json
import math

import numpy as np

from ..errors import InputError

HC_EV_ANGSTROM = 12398.419843320026
EV_TO_J = 1.602176634e-19

CSPAD_PIXEL = 109.92e-6
CSPAD_ASIC = (185, 194)
CSPAD_ASIC_GAP_PX = 3          # the two 274.8 um ASIC-boundary columns, modelled as a gap
CSPAD_SENSOR_GAP_PX = 2        # between the two 2x1 sensors of a pair
CSPAD_PAIR_GAP_PX = 4          # between pairs of 2x1 sensors in a quadrant
# quadrant 0's first pixel block starts at (x, y) = (-30, 70) px; the others are it rotated by
# -90, -180, -270 degrees: a pinwheel around a central hole of +-70 px
CSPAD_QUAD_ORIGIN_PX = (-30, 70)


@dataclasses.dataclass(frozen=True)
class Panel:
    """A flat rectangular block of pixels.

    Parameters
    ----------
    module : int or None
        Index into the first axis of a 3-D frame stack; None for 2-D frames.
    ss0, ss1, fs0, fs1 : int
        Pixel block ``[ss0:ss1, fs0:fs1]`` (slow scan = rows, fast scan = columns).
    corner : tuple of 3 float
        Lab position (m) of the centre of pixel ``(ss0, fs0)``; z relative to ``distance``.
    ss_vec, fs_vec : tuple of 3 float
        Lab displacement (m) for one pixel step along slow / fast scan.
    """

    module: object
    ss0: int
    ss1: int
    fs0: int
    fs1: int
    corner: tuple
    ss_vec: tuple
    fs_vec: tuple

    def to_dict(self):
        return {"module": self.module, "ss0": self.ss0, "ss1": self.ss1, "fs0": self.fs0,
                "fs1": self.fs1, "corner": [float(v) for v in self.corner],
                "ss_vec": [float(v) for v in self.ss_vec],
                "fs_vec": [float(v) for v in self.fs_vec]}

    @classmethod
    def from_dict(cls, d):
        module = d.get("module")
        return cls(None if module is None else int(module), int(d["ss0"]), int(d["ss1"]),
                   int(d["fs0"]), int(d["fs1"]), tuple(map(float, d["corner"])),
                   tuple(map(float, d["ss_vec"])), tuple(map(float, d["fs_vec"])))

    def index(self):
        """Numpy index of this panel's block in a frame."""
        block = (slice(self.ss0, self.ss1), slice(self.fs0, self.fs1))
        return block if self.module is None else (self.module,) + block


def _rle_bad(mask):
    """Run-length encode the False (bad) runs of a flattened boolean mask."""
    flat = np.concatenate([[True], np.asarray(mask, bool).ravel(), [True]])
    d = np.diff(flat.astype(np.int8))
    starts = np.flatnonzero(d == -1)
    ends = np.flatnonzero(d == 1)
    return [[int(s), int(e - s)] for s, e in zip(starts, ends)]


class DetectorGeometry:
    """Stored frame shape + lab position of every pixel, with cached q/phi/solid-angle maps.

    Parameters
    ----------
    frame_shape : tuple of int
        Shape of one stored frame, 2-D ``(ss, fs)`` or 3-D ``(module, ss, fs)``.
    panels : list of Panel
    distance : float
        Sample-detector distance (m) added to every panel's z.
    energy_ev : float
        Photon energy (eV).
    mask : ndarray of bool, optional
        True = good pixel, frame_shape. Default: every pixel covered by a panel is good.
    name : str
    """

    def __init__(self, frame_shape, panels, distance, energy_ev, mask=None, name="detector"):
        self.frame_shape = tuple(int(v) for v in frame_shape)
        if len(self.frame_shape) not in (2, 3):
            raise InputError(f"frame shape must be 2-D or 3-D, got {self.frame_shape}",
                             name)
        self.panels = list(panels)
        self.distance = float(distance)
        self.energy_ev = float(energy_ev)
        if not (self.distance > 0 and self.energy_ev > 0):
            raise InputError("distance and photon energy must be positive "
                             f"(distance={distance}, energy_ev={energy_ev})", name)
        self.name = str(name)
        covered = np.zeros(self.frame_shape, bool)
        for p in self.panels:
            if (p.module is None) != (len(self.frame_shape) == 2):
                raise InputError("panel module index does not match frame dimensionality",
                                 name)
            covered[p.index()] = True
        self._covered = covered
        if mask is None:
            mask = covered
        mask = np.asarray(mask, bool)
        if mask.shape != self.frame_shape:
            raise InputError(f"mask shape {mask.shape} != frame shape {self.frame_shape}",
                             name)
        self.mask = mask & covered
        self._cache = {}

    # ------------------------------------------------------------------ basics
    @property
    def wavelength(self):
        """Wavelength in angstrom."""
        return HC_EV_ANGSTROM / self.energy_ev

    @property
    def n_pixels(self):
        return int(np.prod(self.frame_shape))

    def __repr__(self):
        return (f"DetectorGeometry(name={self.name!r}, frame_shape={self.frame_shape}, "
                f"panels={len(self.panels)}, distance={self.distance:.4f} m, "
                f"energy_ev={self.energy_ev:.1f})")

    # ------------------------------------------------------------------ maps
    def pixel_xyz(self):
        """Lab (x, y, z) of every pixel centre, each a float64 array of frame_shape (m).

        z includes ``distance``. Pixels not covered by any panel get NaN.
        """
        if "xyz" not in self._cache:
            xyz = np.full((3,) + self.frame_shape, np.nan)
            for p in self.panels:
                ss = np.arange(p.ss1 - p.ss0, dtype=float)[:, None]
                fs = np.arange(p.fs1 - p.fs0, dtype=float)[None, :]
                for axis in range(3):
                    xyz[(axis,) + p.index()] = (p.corner[axis] + ss * p.ss_vec[axis]
                                                + fs * p.fs_vec[axis])
            xyz[2] += self.distance
            xyz.setflags(write=False)
            self._cache["xyz"] = xyz
        xyz = self._cache["xyz"]
        return xyz[0], xyz[1], xyz[2]

    def two_theta(self):
        """Scattering angle 2-theta (rad) of every pixel."""
        if "tth" not in self._cache:
            x, y, z = self.pixel_xyz()
            tth = np.arctan2(np.hypot(x, y), z)
            tth.setflags(write=False)
            self._cache["tth"] = tth
        return self._cache["tth"]

    def q_map(self):
        """Momentum transfer q = 4 pi sin(theta) / lambda (1/angstrom) of every pixel.

        Examples
        --------
        >>> g = flat((3, 3), 1e-3, 0.139, 9370.0, beam_center=(1, 1))
        >>> float(g.q_map()[1, 1])
        0.0
        """
        if "q" not in self._cache:
            q = 4.0 * np.pi * np.sin(0.5 * self.two_theta()) / self.wavelength
            q.setflags(write=False)
            self._cache["q"] = q
        return self._cache["q"]

    def phi_map(self):
        """Azimuth atan2(y, x) (rad, -pi..pi) of every pixel."""
        if "phi" not in self._cache:
            x, y, _ = self.pixel_xyz()
            phi = np.arctan2(y, x)
            phi.setflags(write=False)
            self._cache["phi"] = phi
        return self._cache["phi"]

    def solid_angle(self):
        """Relative solid angle of every pixel (1 for a pixel facing the beam at ``distance``).

        Each panel pixel subtends ``|ss_vec x fs_vec| . n_hat / R^2``; normalized by the area
        over ``distance^2`` of the first panel's pixel, so flat detectors give cos^3(2 theta).
        """
        if "solid" not in self._cache:
            x, y, z = self.pixel_xyz()
            r = np.sqrt(x * x + y * y + z * z)
            out = np.full(self.frame_shape, np.nan)
            ref = None
            for p in self.panels:
                normal = np.cross(p.ss_vec, p.fs_vec)
                area = np.linalg.norm(normal)
                if ref is None:
                    ref = area / self.distance ** 2
                idx = p.index()
                cos_inc = np.abs(x[idx] * normal[0] + y[idx] * normal[1]
                                 + z[idx] * normal[2]) / (area * r[idx])
                out[idx] = area * cos_inc / r[idx] ** 2 / ref
            out.setflags(write=False)
            self._cache["solid"] = out
        return self._cache["solid"]

    def polarization(self, fraction=0.99, plane="horizontal"):
        """Polarization factor of every pixel (1 on the beam axis).

        ``P = 0.5 * (1 + cos^2 2t - f' cos(2 phi) sin^2 2t)`` with ``f' = 2 fraction - 1`` for a
        beam polarized in the horizontal (x) plane; ``plane="vertical"`` flips the sign.
        """
        if plane not in ("horizontal", "vertical"):
            raise InputError(f"polarization plane must be horizontal or vertical, got {plane!r}")
        key = ("pol", float(fraction), plane)
        if key not in self._cache:
            tth = self.two_theta()
            phi = self.phi_map()
            f = 2.0 * float(fraction) - 1.0
            if plane == "vertical":
                f = -f
            s2 = np.sin(tth) ** 2
            pol = 0.5 * (1.0 + np.cos(tth) ** 2 - f * np.cos(2.0 * phi) * s2)
            pol.setflags(write=False)
            self._cache[key] = pol
        return self._cache[key]

    def with_mask(self, mask):
        """A copy of this geometry with ``mask & self.mask`` (True = good)."""
        g = DetectorGeometry(self.frame_shape, self.panels, self.distance, self.energy_ev,
                             mask=self.mask & np.asarray(mask, bool), name=self.name)
        g._cache = self._cache  # maps do not depend on the mask
        return g

    def locate(self, x, y):
        """Frame index ``(module, ss, fs)`` (floats, module None for 2-D) of lab point (x, y)
        on the detector, or None if it falls in a gap. Panels are assumed normal to the beam
        for this inverse lookup."""
        for p in self.panels:
            m = np.array([[p.ss_vec[0], p.fs_vec[0]], [p.ss_vec[1], p.fs_vec[1]]])
            try:
                ss, fs = np.linalg.solve(m, [x - p.corner[0], y - p.corner[1]])
            except np.linalg.LinAlgError:
                continue
            if -0.5 <= ss < p.ss1 - p.ss0 - 0.5 and -0.5 <= fs < p.fs1 - p.fs0 - 0.5:
                return p.module, p.ss0 + ss, p.fs0 + fs, p
        return None

    # ------------------------------------------------------------------ I/O
    def to_dict(self):
        """JSON-able description (bad pixels run-length encoded)."""
        return {"name": self.name, "frame_shape": list(self.frame_shape),
                "distance": self.distance, "energy_ev": self.energy_ev,
                "panels": [p.to_dict() for p in self.panels],
                "bad_pixel_runs": _rle_bad(self.mask | ~self._covered)}

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict`."""
        try:
            shape = tuple(d["frame_shape"])
            panels = [Panel.from_dict(p) for p in d["panels"]]
            mask = np.ones(int(np.prod(shape)), bool)
            for start, length in d.get("bad_pixel_runs", []):
                mask[start:start + length] = False
            return cls(shape, panels, d["distance"], d["energy_ev"], mask=mask.reshape(shape),
                       name=d.get("name", "detector"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"bad geometry description: {exc}", "geometry") from exc

    def to_json(self):
        return json.dumps(self.to_dict())

    def write_cxi(self, detector_group, source_group=None):
        """Write this geometry into open CXI groups (``.../detector_1``, ``.../source_1``).

        Writes ``distance`` (m), ``x_pixel_size``, ``y_pixel_size`` (m, of the first panel),
        ``corner_positions`` (n_panels, 3; absolute, z includes distance),
        ``basis_vectors`` (n_panels, 2, 3: [ss_vec, fs_vec], (x, y, z) in m),
        ``mask`` (CXI convention: 0 = good, 1 = bad), ``lcls_dl_panels`` (n_panels, 5) int
        (module or -1, ss0, ss1, fs0, fs1) and ``source_1/energy`` (J).
        """
        d = detector_group
        d["distance"] = self.distance
        d["distance"].attrs["units"] = "m"
        p0 = self.panels[0]
        d["x_pixel_size"] = float(np.linalg.norm(p0.fs_vec))
        d["y_pixel_size"] = float(np.linalg.norm(p0.ss_vec))
        corners = np.array([p.corner for p in self.panels], float)
        corners[:, 2] += self.distance
        d["corner_positions"] = corners
        d["basis_vectors"] = np.array([[p.ss_vec, p.fs_vec] for p in self.panels], float)
        d["lcls_dl_panels"] = np.array(
            [[-1 if p.module is None else p.module, p.ss0, p.ss1, p.fs0, p.fs1]
             for p in self.panels], np.int32)
        d.create_dataset("mask", data=(~self.mask).astype(np.uint16), compression="gzip",
                         compression_opts=1)
        d["mask"].attrs["convention"] = "CXI: 0 = good pixel, nonzero = bad"
        d.attrs["lcls_dl_name"] = self.name
        if source_group is not None:
            source_group["energy"] = self.energy_ev * EV_TO_J
            source_group["energy"].attrs["units"] = "J"

    @classmethod
    def from_cxi(cls, h5file, frame_shape, entry="/entry_1"):
        """Read the geometry of a CXI file (see :meth:`write_cxi`).

        Without ``lcls_dl_panels`` the whole frame is one panel (or one per module of a 3-D
        stack) in the order of ``corner_positions``.
        """
        where = getattr(h5file, "filename", "cxi")
        frame_shape = tuple(int(v) for v in frame_shape)
        try:
            det = h5file[f"{entry}/instrument_1/detector_1"]
            distance = float(np.asarray(det["distance"][()]).ravel()[0])
            energy_j = float(np.asarray(h5file[f"{entry}/instrument_1/source_1/energy"][()])
                             .ravel()[0])
        except KeyError as exc:
            raise InputError(f"CXI geometry incomplete: {exc}", where) from exc
        px = float(np.asarray(det["x_pixel_size"][()]).ravel()[0]) if "x_pixel_size" in det \
            else None
        py = float(np.asarray(det["y_pixel_size"][()]).ravel()[0]) if "y_pixel_size" in det \
            else px
        if "lcls_dl_panels" in det:
            blocks = np.asarray(det["lcls_dl_panels"][()]).reshape(-1, 5)
        elif len(frame_shape) == 3:
            blocks = np.array([[m, 0, frame_shape[1], 0, frame_shape[2]]
                               for m in range(frame_shape[0])])
        else:
            blocks = np.array([[-1, 0, frame_shape[0], 0, frame_shape[1]]])
        n = len(blocks)
        if "corner_positions" in det:
            corners = np.asarray(det["corner_positions"][()], float).reshape(-1, 3)
        elif px is not None:
            ss_n, fs_n = frame_shape[-2:]
            corners = np.array([[-(fs_n - 1) / 2 * px, -(ss_n - 1) / 2 * py, distance]] * n)
        else:
            raise InputError("CXI geometry has neither corner_positions nor pixel size",
                             where)
        if "basis_vectors" in det:
            basis = np.asarray(det["basis_vectors"][()], float).reshape(-1, 2, 3)
        elif px is not None:
            basis = np.array([[[0, py, 0], [px, 0, 0]]] * n, float)
        else:
            raise InputError("CXI geometry has no basis vectors", where)
        if len(corners) == 1 and n > 1:
            corners = np.repeat(corners, n, axis=0)
        if len(basis) == 1 and n > 1:
            basis = np.repeat(basis, n, axis=0)
        if len(corners) != n or len(basis) != n:
            raise InputError(f"CXI geometry has {len(corners)} corners and {len(basis)} basis "
                             f"vectors for {n} panels", where)
        panels = []
        for (module, ss0, ss1, fs0, fs1), c, b in zip(blocks, corners, basis):
            module = None if module < 0 else int(module)
            panels.append(Panel(module, int(ss0), int(ss1), int(fs0), int(fs1),
                                (c[0], c[1], c[2] - distance), tuple(b[0]), tuple(b[1])))
        mask = None
        if "mask" in det:
            m = np.asarray(det["mask"][()])
            if m.shape == frame_shape:
                mask = m == 0
        name = det.attrs.get("lcls_dl_name", "cxi")
        if isinstance(name, bytes):
            name = name.decode()
        return cls(frame_shape, panels, distance, energy_j / EV_TO_J, mask=mask, name=str(name))


# ---------------------------------------------------------------------- builders
def _rot(deg):
    c, s = round(math.cos(math.radians(deg))), round(math.sin(math.radians(deg)))
    return np.array([[c, -s], [s, c]], float)


def cspad(distance=0.139, energy_ev=9370.0, layout="slab"):
    """LCLS CSPAD (2.3 Mpixel): 4 quadrants x 8 two-by-one sensors x 2 ASICs of 185x194.

    Parameters
    ----------
    distance : float
        Sample-detector distance (m); cxi25410 "high q" runs used 0.139.
    energy_ev : float
    layout : {"slab", "modules"}
        ``"slab"``: Cheetah's raw 1480x1552 array, module ``m = quad * 8 + sensor`` at rows
        ``sensor * 185`` and columns ``quad * 388``. ``"modules"``: psana's (32, 185, 388).

    Notes
    -----
    64 ASIC panels of 109.92 um pixels. The two wide (274.8 um) ASIC-boundary columns are
    modelled as a 3-pixel gap between the ASICs of a 2x1. Each quadrant holds four pairs of
    2x1 sensors in a pinwheel (pairs alternately rotated by 90 degrees, like the real CSPAD);
    quadrant ``k`` is the first rotated by ``-90 k`` degrees about the beam, a pinwheel of
    quadrants around a central hole of +-70 pixels (q >= 0.26 1/A at 139 mm and 9.37 keV)
    with ~40-pixel quadrant gaps; the assembled image spans ~1670x1670 pixels (q <= 3.5).

    Examples
    --------
    >>> cspad(layout="modules").frame_shape
    (32, 185, 388)
    >>> len(cspad().panels)
    64
    """
    if layout not in ("slab", "modules"):
        raise InputError(f"CSPAD layout must be 'slab' or 'modules', got {layout!r}")
    pix = CSPAD_PIXEL
    a_ss, a_fs = CSPAD_ASIC
    long_px = 2 * a_fs + CSPAD_ASIC_GAP_PX            # 391
    short_px = 2 * a_ss + CSPAD_SENSOR_GAP_PX         # 372 for a pair
    g = CSPAD_PAIR_GAP_PX
    u, v = CSPAD_QUAD_ORIGIN_PX
    # pinwheel of 4 pairs (u0, v0, horizontal?) in quadrant-local pixels
    pairs = [(u, v, True), (u + long_px + g, v, False), (u, v + short_px + g, False),
             (u + short_px + g, v + long_px + g, True)]
    panels = []
    for quad in range(4):
        rot = _rot(-90 * quad)
        for sensor in range(8):
            u0, v0, horizontal = pairs[sensor // 2]
            k = sensor % 2
            for asic in range(2):
                if horizontal:   # long axis (fs) along +u, ss along +v
                    start = np.array([u0 + asic * (a_fs + CSPAD_ASIC_GAP_PX),
                                      v0 + k * (a_ss + CSPAD_SENSOR_GAP_PX)], float)
                    fs_dir, ss_dir = np.array([1.0, 0.0]), np.array([0.0, 1.0])
                else:            # long axis along +v, ss along -u
                    start = np.array([u0 + short_px - 1 - k * (a_ss + CSPAD_SENSOR_GAP_PX),
                                      v0 + asic * (a_fs + CSPAD_ASIC_GAP_PX)], float)
                    fs_dir, ss_dir = np.array([0.0, 1.0]), np.array([-1.0, 0.0])
                corner = rot @ start * pix
                fs_vec = rot @ fs_dir * pix
                ss_vec = rot @ ss_dir * pix
                m = quad * 8 + sensor
                if layout == "slab":
                    module, ss0, fs0 = None, sensor * a_ss, quad * 2 * a_fs + asic * a_fs
                else:
                    module, ss0, fs0 = m, 0, asic * a_fs
                panels.append(Panel(module, ss0, ss0 + a_ss, fs0, fs0 + a_fs,
                                    (corner[0], corner[1], 0.0),
                                    (ss_vec[0], ss_vec[1], 0.0), (fs_vec[0], fs_vec[1], 0.0)))
    shape = (8 * a_ss, 4 * 2 * a_fs) if layout == "slab" else (32, a_ss, 2 * a_fs)
    return DetectorGeometry(shape, panels, distance, energy_ev, name=f"cspad-{layout}")


def jungfrau4m(distance=0.139, energy_ev=9370.0):
    """Jungfrau 4M: (8, 512, 1024) modules of 75 um pixels, 2 columns x 4 rows, central hole.

    Examples
    --------
    >>> jungfrau4m().frame_shape
    (8, 512, 1024)
    """
    pix = 75e-6
    gap_y, hole = 36, 10
    panels = []
    for m in range(8):
        col, row = m % 2, m // 2
        x0 = (hole / 2) if col == 1 else -(hole / 2) - 1023
        y0 = (row - 2) * (512 + gap_y) + gap_y / 2
        panels.append(Panel(m, 0, 512, 0, 1024, (x0 * pix, y0 * pix, 0.0),
                            (0.0, pix, 0.0), (pix, 0.0, 0.0)))
    return DetectorGeometry((8, 512, 1024), panels, distance, energy_ev, name="jungfrau4m")


def epix10k2m(distance=0.139, energy_ev=9370.0):
    """ePix10k 2M: (16, 352, 384) modules of 100 um pixels, 4 quadrants of 2x2 modules.

    Examples
    --------
    >>> epix10k2m().frame_shape
    (16, 352, 384)
    """
    pix = 100e-6
    gap, hole = 10, 12
    panels = []
    for quad in range(4):
        rot = _rot(-90 * quad)
        for k in range(4):
            start = np.array([hole + (k % 2) * (384 + gap), hole + (k // 2) * (352 + gap)],
                             float)
            corner = rot @ start * pix
            fs_vec = rot @ np.array([1.0, 0.0]) * pix
            ss_vec = rot @ np.array([0.0, 1.0]) * pix
            panels.append(Panel(quad * 4 + k, 0, 352, 0, 384, (corner[0], corner[1], 0.0),
                                (ss_vec[0], ss_vec[1], 0.0), (fs_vec[0], fs_vec[1], 0.0)))
    return DetectorGeometry((16, 352, 384), panels, distance, energy_ev, name="epix10k2m")


def flat(frame_shape, pixel_size, distance, energy_ev, beam_center=None, name="flat"):
    """One flat panel normal to the beam; ``beam_center=(ss, fs)`` in pixels (default centre).

    Examples
    --------
    >>> g = flat((256, 256), 400e-6, 0.1, 9370.0)
    >>> g.q_map().shape
    (256, 256)
    """
    ss_n, fs_n = (int(v) for v in frame_shape)
    if beam_center is None:
        beam_center = ((ss_n - 1) / 2, (fs_n - 1) / 2)
    bss, bfs = (float(v) for v in beam_center)
    p = float(pixel_size)
    panel = Panel(None, 0, ss_n, 0, fs_n, (-bfs * p, -bss * p, 0.0), (0.0, p, 0.0),
                  (p, 0.0, 0.0))
    return DetectorGeometry((ss_n, fs_n), [panel], distance, energy_ev, name=name)


def _read_poni(path):
    values = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line or line.startswith("#") or ":" not in line:
                    continue
                key, value = line.split(":", 1)
                values[key.strip().lower()] = value.strip()
    except OSError as exc:
        raise InputError(f"cannot read PONI file: {exc.strerror}", str(path)) from exc
    return values


def from_poni(path, frame_shape, pixel_size=None, energy_ev=None):
    """Geometry of a pyFAI PONI file (Distance, Poni1, Poni2, Rot1..3, Wavelength, Detector).

    Follows pyFAI's convention: dim 1 = slow scan = lab y, dim 2 = fast scan = lab x; rotations
    applied as pyFAI does, so ``q_map`` agrees with pyFAI's ``qArray`` (nm^-1 / 10).

    Parameters
    ----------
    path : str
    frame_shape : tuple of 2 int
    pixel_size : float or (float, float), optional
        (m); read from ``Detector_config`` / ``PixelSize1/2`` if absent.
    energy_ev : float, optional
        Overrides ``Wavelength``.
    """
    v = _read_poni(path)
    try:
        dist = float(v["distance"])
        poni1, poni2 = float(v["poni1"]), float(v["poni2"])
        rot = [float(v.get(f"rot{i}", 0.0)) for i in (1, 2, 3)]
    except (KeyError, ValueError) as exc:
        raise InputError(f"PONI file lacks or garbles {exc}", str(path)) from exc
    if pixel_size is None:
        if "detector_config" in v:
            try:
                cfg = json.loads(v["detector_config"])
                pixel_size = (float(cfg["pixel1"]), float(cfg["pixel2"]))
            except (ValueError, KeyError, TypeError):
                pixel_size = None
        if pixel_size is None and "pixelsize1" in v:
            pixel_size = (float(v["pixelsize1"]), float(v["pixelsize2"]))
        if pixel_size is None:
            raise InputError("PONI file gives no pixel size; pass pixel_size", str(path))
    if np.ndim(pixel_size) == 0:
        pixel_size = (float(pixel_size), float(pixel_size))
    p1, p2 = (float(x) for x in pixel_size)
    if energy_ev is None:
        if "wavelength" not in v:
            raise InputError("PONI file gives no wavelength; pass energy_ev", str(path))
        energy_ev = HC_EV_ANGSTROM / (float(v["wavelength"]) * 1e10)
    c1, c2, c3 = (math.cos(r) for r in rot)
    s1, s2, s3 = (math.sin(r) for r in rot)

    def lab(d1, d2, L):
        t1 = d1 * c2 * c3 + d2 * (c3 * s1 * s2 - c1 * s3) - L * (c1 * c3 * s2 + s1 * s3)
        t2 = d1 * c2 * s3 + d2 * (c1 * c3 + s1 * s2 * s3) - L * (-(c3 * s1) + c1 * s2 * s3)
        t3 = d1 * s2 - d2 * c2 * s1 + L * c1 * c2
        return np.array([t2, t1, t3])   # (x = dim2, y = dim1, z)

    origin = lab(0.5 * p1 - poni1, 0.5 * p2 - poni2, dist)
    ss_vec = lab(1.5 * p1 - poni1, 0.5 * p2 - poni2, dist) - origin
    fs_vec = lab(0.5 * p1 - poni1, 1.5 * p2 - poni2, dist) - origin
    ss_n, fs_n = (int(x) for x in frame_shape)
    corner = (origin[0], origin[1], origin[2] - dist)
    panel = Panel(None, 0, ss_n, 0, fs_n, corner, tuple(ss_vec), tuple(fs_vec))
    return DetectorGeometry((ss_n, fs_n), [panel], dist, energy_ev,
                            name=v.get("detector", "poni"))


BUILDERS = {"cspad": cspad, "jungfrau4m": jungfrau4m, "epix10k2m": epix10k2m}


def by_name(name, distance=0.139, energy_ev=9370.0):
    """Build a named detector: ``cspad``, ``cspad-modules``, ``jungfrau4m``, ``epix10k2m``."""
    if name == "cspad-modules":
        return cspad(distance, energy_ev, layout="modules")
    if name not in BUILDERS:
        raise InputError(f"unknown detector {name!r}; choose from "
                         f"{', '.join(sorted(BUILDERS) + ['cspad-modules'])}")
    return BUILDERS[name](distance, energy_ev)
