"""CXI files: what ``lcls-dl simulate`` writes, CXIDB files, Cheetah/psocake multi-event CXI.

Layout (CXIDB specification, SI units)::

    /entry_1/data_1/data                       (N, ss, fs) or (N, modules, ss, fs)
    /entry_1/instrument_1/detector_1/          distance [m], x/y_pixel_size [m],
                                               corner_positions, basis_vectors, mask
    /entry_1/instrument_1/source_1/energy      [J]
    /entry_1/result_1/nPeaks ...               Cheetah/psocake hit finding (-> ``extra``)
    /LCLS/photon_energy_eV, /LCLS/eventNumber  Cheetah/psocake per-event machine data
    /LCLS/detector_1/EncoderValue              [mm] camera length encoder

Frames are ``(N, ss, fs)`` slabs (e.g. the CSPAD raw slab 1480x1552) or module stacks
``(N, 32, 185, 388)``; psana's per-ASIC stack ``(N, 64, 185, 194)`` is presented as
``(N, 32, 185, 388)`` (ASIC pairs side by side, as on the sensor). Geometry comes from the
file (``DetectorGeometry.from_cxi``); files without one (Cheetah multi-event CXI) get the
CSPAD geometry when the frames have a CSPAD shape, or the geometry flags.
Event numbers are frame indices in the file; psana's ``/LCLS/eventNumber`` goes to ``extra``.
``detector_1/lcls_dl_adu_per_photon`` and ``lcls_dl_pedestal`` (written by ``lcls-dl
simulate``) become ``calibration``.
"""
import numpy as np

from ...errors import InputError
from . import (FrameSource, apply_mask, check_frames_dataset, geometry_from_options, load_mask,
               open_h5, read_rows)

JOULE_PER_EV = 1.602176634e-19
CSPAD_MODULES = (32, 185, 388)
CSPAD_ASICS = (64, 185, 194)
CSPAD_SLAB = (1480, 1552)
DATA_PATHS = ("entry_1/data_1/data", "entry_1/instrument_1/detector_1/data",
              "entry_1/image_1/data")


def asics_to_modules(frames):
    """``(k, 64, 185, 194)`` per-ASIC stack -> ``(k, 32, 185, 388)`` 2x1 sensors."""
    k = frames.shape[0]
    return frames.reshape(k, 32, 2, 185, 194).transpose(0, 1, 3, 2, 4).reshape(k, 32, 185, 388)


class CXISource(FrameSource):
    """Frames of a CXI file (see module docstring)."""

    reader = "cxi"

    def __init__(self, path, name=None, dataset=None, mask=None, classes=None, **options):
        super().__init__(path, name)
        self._f = open_h5(self.path)
        try:
            self._open(dataset, mask, options)
        except BaseException:
            self._f.close()
            raise

    def _open(self, dataset, mask_path, options):
        f = self._f
        paths = [dataset] if dataset else [p for p in DATA_PATHS if p in f]
        if not paths or paths[0] not in f:
            raise InputError(f"no frames dataset {dataset or DATA_PATHS[0]} in CXI file",
                             self.path)
        self._dset = f[paths[0]]
        check_frames_dataset(self._dset, f"{self.path}:/{paths[0]}")
        shape = tuple(self._dset.shape[1:])
        self._asics = shape == CSPAD_ASICS
        self.frame_shape = CSPAD_MODULES if self._asics else shape
        self.n_frames = int(self._dset.shape[0])
        self.dtype = self._dset.dtype
        self.events = np.arange(self.n_frames, dtype=np.int64)
        self.extra = self._extras()
        self.geometry = self._geometry(options)
        det = "entry_1/instrument_1/detector_1"
        for key, name in (("adu_per_photon", "lcls_dl_adu_per_photon"),
                          ("pedestal", "lcls_dl_pedestal")):
            if f"{det}/{name}" in f:
                self.calibration[key] = float(np.asarray(f[f"{det}/{name}"][()]).reshape(-1)[0])
        self.geometry = apply_mask(self.geometry, load_mask(mask_path, self.frame_shape))

    def _extras(self):
        f, n, out = self._f, self.n_frames, {}
        for group in ("entry_1/result_1", "LCLS"):
            if group not in f or not hasattr(f[group], "keys"):
                continue
            for key, obj in f[group].items():
                if hasattr(obj, "shape") and obj.ndim == 1 and obj.shape[0] == n \
                        and obj.dtype.kind in "uifb":
                    out[key] = obj[...]
        return out

    def _energy_ev(self):
        f = self._f
        if "entry_1/instrument_1/source_1/energy" in f:
            e = np.asarray(f["entry_1/instrument_1/source_1/energy"][...], float).reshape(-1)
            e = e[np.isfinite(e) & (e > 0)]
            if len(e):
                return float(np.median(e)) / JOULE_PER_EV
        if "LCLS/photon_energy_eV" in f:
            e = np.asarray(f["LCLS/photon_energy_eV"][...], float).reshape(-1)
            e = e[np.isfinite(e) & (e > 0)]
            if len(e):
                return float(np.median(e))
        return None

    def _distance(self):
        f = self._f
        if "entry_1/instrument_1/detector_1/distance" in f:
            d = np.asarray(f["entry_1/instrument_1/detector_1/distance"][...], float).reshape(-1)
            d = d[np.isfinite(d) & (d > 0)]
            if len(d):
                return float(np.median(d))
        return None

    def _geometry(self, options):
        from .. import geometry as geom

        flags = any(options.get(k) is not None for k in
                    ("poni", "pixel_size_um", "distance_mm", "beam_center"))
        if flags and len(self.frame_shape) == 2:
            base = {"distance": self._distance(), "energy_ev": self._energy_ev()}
            g = geometry_from_options(self.frame_shape, options, self.path, base)
            if g is not None:
                return g
        det = "entry_1/instrument_1/detector_1"
        if det in self._f and any(k in self._f[det] for k in
                                  ("corner_positions", "basis_vectors", "lcls_dl_panels")):
            try:
                g = geom.DetectorGeometry.from_cxi(self._f, self.frame_shape)
            except InputError:
                raise
            except (KeyError, ValueError, TypeError, OSError) as exc:
                raise InputError(f"bad detector geometry in CXI file: {exc}", self.path) from None
            if options.get("energy_ev"):
                g.energy_ev = float(options["energy_ev"])
            return g
        energy = options.get("energy_ev") or self._energy_ev() or 9370.0
        distance = (options["distance_mm"] * 1e-3 if options.get("distance_mm")
                    else self._distance() or 0.139)
        if self.frame_shape == CSPAD_MODULES:
            return geom.cspad(distance=distance, energy_ev=energy, layout="modules")
        if self.frame_shape == CSPAD_SLAB:
            return geom.cspad(distance=distance, energy_ev=energy, layout="slab")
        base = {"distance": self._distance(), "energy_ev": self._energy_ev()}
        return geometry_from_options(self.frame_shape, options, self.path, base)

    def read(self, start, stop):
        data = read_rows(self._dset, start, stop, self.where(start))
        return asics_to_modules(data) if self._asics else data

    def close(self):
        try:
            self._f.close()
        except Exception:  # already closed
            pass
