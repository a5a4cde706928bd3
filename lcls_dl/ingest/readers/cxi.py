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
``(N, 32, 185, 388)`` (ASIC pairs side by side, as on the sensor; a per-ASIC geometry of 64
``corner_positions`` is mapped the same way). Geometry comes from the file
(``DetectorGeometry.from_cxi``; ``energy_ev``/``distance_mm`` replace its energy/distance);
files without one (Cheetah multi-event CXI) get the CSPAD geometry when the frames have a
CSPAD shape, or the geometry flags. Energies outside 10 eV-1 MeV or distances over 100 m
after reading J and m are refused (a file that stores eV or mm is not SI).
Event numbers are frame indices in the file; psana's ``/LCLS/eventNumber`` goes to ``extra``.
``detector_1/lcls_dl_adu_per_photon`` and ``lcls_dl_pedestal`` (written by ``lcls-dl
simulate``) become ``calibration``.
"""
import logging

import numpy as np

from ...errors import InputError
from . import (HDF5Source, apply_mask, check_frames_dataset, first_value, geometry_from_options,
               load_mask, positive_median)

JOULE_PER_EV = 1.602176634e-19
CSPAD_MODULES = (32, 185, 388)
CSPAD_ASICS = (64, 185, 194)
CSPAD_SLAB = (1480, 1552)
DATA_PATHS = ("entry_1/data_1/data", "entry_1/instrument_1/detector_1/data",
              "entry_1/image_1/data")
DETECTOR = "entry_1/instrument_1/detector_1"
#: photon energies (eV) and distances (m) a CXI file's SI values must lie in: a file that
#: stores eV or mm where the CXIDB specification asks for J and m fails here, not in q
ENERGY_RANGE_EV = (10.0, 1e6)
MAX_DISTANCE_M = 100.0


def asics_to_modules(frames):
    """``(k, 64, 185, 194)`` per-ASIC stack -> ``(k, 32, 185, 388)`` 2x1 sensors."""
    k = frames.shape[0]
    return frames.reshape(k, 32, 2, 185, 194).transpose(0, 1, 3, 2, 4).reshape(k, 32, 185, 388)


def asic_geometry_to_modules(g):
    """A per-ASIC geometry of frame shape ``(64, 185, 194)`` as one of ``(32, 185, 388)``.

    ASIC ``a`` is the left (even ``a``) or right half of 2x1 sensor ``a // 2``, as
    :func:`asics_to_modules` places the data; the mask follows the same way.
    """
    from ..geometry import DetectorGeometry, Panel

    width = CSPAD_ASICS[2]
    panels = []
    for p in g.panels:
        shift = (p.module % 2) * width
        panels.append(Panel(p.module // 2, p.ss0, p.ss1, p.fs0 + shift, p.fs1 + shift,
                            p.corner, p.ss_vec, p.fs_vec))
    mask = asics_to_modules(np.asarray(g.mask)[None])[0]
    return DetectorGeometry(CSPAD_MODULES, panels, g.distance, g.energy_ev, mask=mask,
                            name=g.name)


class CXISource(HDF5Source):
    """Frames of a CXI file (see module docstring)."""

    reader = "cxi"

    def _open(self, dataset=None, mask=None, classes=None, **options):
        f = self._f
        paths = [dataset] if dataset else [p for p in DATA_PATHS if p in f]
        if not paths or paths[0] not in f:
            raise InputError(f"no frames dataset {dataset or DATA_PATHS[0]} in CXI file",
                             self.path)
        dset = f[paths[0]]
        check_frames_dataset(dset, f"{self.path}:/{paths[0]}")
        self._asics = tuple(dset.shape[1:]) == CSPAD_ASICS
        self._use_frames(dset, CSPAD_MODULES if self._asics else None)
        self.extra = self._extras()
        self.geometry = self._geometry(options)
        for key, name in (("adu_per_photon", "lcls_dl_adu_per_photon"),
                          ("pedestal", "lcls_dl_pedestal")):
            if f"{DETECTOR}/{name}" in f:
                self.calibration[key] = first_value(f[f"{DETECTOR}/{name}"])
        self.geometry = apply_mask(self.geometry, load_mask(mask, self.frame_shape))

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
        joules = positive_median(self._f, "entry_1/instrument_1/source_1/energy")
        if joules is not None:
            return self._plausible(energy_ev=joules / JOULE_PER_EV)
        return positive_median(self._f, "LCLS/photon_energy_eV")

    def _distance(self):
        return self._plausible(distance=positive_median(self._f, f"{DETECTOR}/distance"))

    def _plausible(self, energy_ev=None, distance=None):
        """Refuse values that are not SI (eV stored as J, mm as m); returns the value given."""
        if energy_ev is not None and not ENERGY_RANGE_EV[0] <= energy_ev <= ENERGY_RANGE_EV[1]:
            raise InputError(f"photon energy {energy_ev:.4g} eV is implausible (CXI stores "
                             "source_1/energy in joules)", self.path)
        if distance is not None and not distance <= MAX_DISTANCE_M:
            raise InputError(f"detector distance {distance:.4g} m is implausible (CXI stores "
                             "detector_1/distance in metres)", self.path)
        return distance if energy_ev is None else energy_ev

    def _file_geometry(self):
        """``DetectorGeometry.from_cxi`` of the file, per-ASIC geometry mapped to 2x1s."""
        from .. import geometry as geom

        det = self._f[DETECTOR]
        asic_panels = (self._asics and "lcls_dl_panels" not in det
                       and "corner_positions" in det
                       and np.asarray(det["corner_positions"]).size == 3 * CSPAD_ASICS[0])
        try:
            if asic_panels:
                return asic_geometry_to_modules(
                    geom.DetectorGeometry.from_cxi(self._f, CSPAD_ASICS))
            return geom.DetectorGeometry.from_cxi(self._f, self.frame_shape)
        except InputError:
            raise
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise InputError(f"bad detector geometry in CXI file: {exc}", self.path) from None

    def _geometry(self, options):
        from .. import geometry as geom

        flags = any(options.get(k) is not None for k in
                    ("poni", "pixel_size_um", "distance_mm", "beam_center"))
        if flags and len(self.frame_shape) == 2:
            g = geometry_from_options(self.frame_shape, options, self.path, self._base(options))
            if g is not None:
                return g
        if DETECTOR in self._f and any(k in self._f[DETECTOR] for k in
                                       ("corner_positions", "basis_vectors", "lcls_dl_panels")):
            g = self._file_geometry()
            if not options.get("energy_ev"):
                self._plausible(energy_ev=g.energy_ev)
            if not options.get("distance_mm"):
                self._plausible(distance=g.distance)
            if options.get("energy_ev") or options.get("distance_mm"):
                distance = (options["distance_mm"] * 1e-3 if options.get("distance_mm")
                            else g.distance)
                g = geom.DetectorGeometry(g.frame_shape, g.panels, distance,
                                          options.get("energy_ev") or g.energy_ev,
                                          mask=g.mask, name=g.name)
            return g
        energy = options.get("energy_ev") or self._energy_ev()
        distance = options["distance_mm"] * 1e-3 if options.get("distance_mm") else self._distance()
        if self.frame_shape in (CSPAD_MODULES, CSPAD_SLAB) and not (energy and distance):
            # a CSPAD file without its beamline numbers: assume cxi25410's, and say so
            logging.getLogger(__name__).warning(
                "%s: no %s in the file; assuming the cxi25410 values (use --energy-ev / "
                "--distance-mm to set them)", self.path,
                " or ".join(k for k, v in (("photon energy", energy), ("distance", distance))
                            if not v))
            energy, distance = energy or 9370.0, distance or 0.139
        if self.frame_shape == CSPAD_MODULES:
            return geom.cspad(distance=distance, energy_ev=energy, layout="modules")
        if self.frame_shape == CSPAD_SLAB:
            return geom.cspad(distance=distance, energy_ev=energy, layout="slab")
        return geometry_from_options(self.frame_shape, options, self.path, self._base(options))

    def _base(self, options):
        """The file's distance and energy where no flag replaces them (for the flag geometry)."""
        return {"distance": None if options.get("distance_mm") else self._distance(),
                "energy_ev": None if options.get("energy_ev") else self._energy_ev()}

    def read(self, start, stop, out=None):
        data = super().read(start, stop, out=None if self._asics else out)
        return asics_to_modules(data) if self._asics else data
