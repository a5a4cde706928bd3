"""NeXus NXmx files (Eiger, Jungfrau, as written by DECTRIS/PSI/DIALS tools).

A master file ``*_master.h5`` holds the metadata and links to the frames::

    /entry/data/data_000001 -> external link to *_data_000001.h5:/entry/data/data  (n1, H, W)
    /entry/data/data_000002 -> ...                                                  (n2, H, W)
    /entry/instrument/detector/{x_pixel_size, y_pixel_size, detector_distance,
                                beam_center_x, beam_center_y, pixel_mask}
    /entry/instrument/beam/incident_wavelength

Data files are usually compressed with bitshuffle-LZ4 (HDF5 filter 32008), LZ4 (32004) or
Blosc (32001); ``hdf5plugin`` is imported before any read so these filters are available.
Every length honors its ``units`` attribute (m, mm, um, nm, angstrom; NXmx default m for
lengths, angstrom for the wavelength); without a wavelength the photon energy is
``/entry/instrument/beam/incident_energy`` (eV, keV, MeV or J; default eV). Beam centres are
in pixels unless their ``units`` is a length. ``pixel_mask`` follows NXmx: 0 = good pixel.
The frames of all links form one sequence in link-name order; event numbers run 0..N-1 over
it; ``read`` clips ``stop`` to the number of frames, as the other readers do.
"""
import os

import numpy as np

from ...errors import InputError
from . import (HDF5Source, apply_mask, check_frames_dataset, first_value, geometry_from_options,
               load_mask, read_rows, units_of)

HC_EV_ANGSTROM = 12398.419843320026
_LENGTH = {"m": 1.0, "meter": 1.0, "meters": 1.0, "metre": 1.0, "cm": 1e-2, "mm": 1e-3,
           "millimeter": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6, "microns": 1e-6,
           "micrometer": 1e-6, "nm": 1e-9, "nanometer": 1e-9, "angstrom": 1e-10, "a": 1e-10,
           "å": 1e-10, "ang": 1e-10}
# looked up as written first (meV and MeV differ only in case), then case-folded
_ENERGY = {"meV": 1e-3, "MeV": 1e6, "ev": 1.0, "kev": 1e3, "j": 1.0 / 1.602176634e-19}


def to_metres(dset, default="m", where=None):
    """Value of a scalar dataset in metres, honoring its ``units`` attribute."""
    value = first_value(dset)
    units = units_of(dset, default)
    factor = _LENGTH.get(units.strip().lower())
    if factor is None:
        raise InputError(f"unknown length units {units!r}", where)
    return value * factor


def to_ev(dset, default="eV", where=None):
    """Value of a scalar photon-energy dataset in eV, honoring its ``units`` attribute."""
    units = units_of(dset, default).strip()
    factor = _ENERGY.get(units, _ENERGY.get(units.lower()))
    if factor is None:
        raise InputError(f"unknown energy units {units!r}", where)
    return first_value(dset) * factor


class NexusSource(HDF5Source):
    """Frames of an NXmx master file and its linked data files."""

    reader = "nexus"

    def _open(self, dataset=None, mask=None, classes=None, **options):
        import h5py

        f = self._f
        if dataset:
            names = [dataset]
        elif "entry/data" in f:
            names = sorted(f"entry/data/{k}" for k in f["entry/data"].keys()
                           if k.startswith("data"))
        else:
            names = []
        if not names:
            raise InputError("no /entry/data/data_NNNNNN frames in NeXus file", self.path)
        self._parts, offset = [], 0
        for n in names:
            link = f.get(n, getlink=True)
            where = f"{self.path}:/{n}"
            if isinstance(link, h5py.ExternalLink):
                target = os.path.join(os.path.dirname(self.path), link.filename)
                where = f"{target}:{link.path}"
                if not os.path.exists(target):
                    raise InputError("external link target file not found", where)
            try:
                dset = f[n]
            except (KeyError, OSError) as exc:
                raise InputError(f"cannot open linked frames: {' '.join(str(exc).split())}",
                                 where) from None
            check_frames_dataset(dset, where, ndim=(3,))
            if self._parts and dset.shape[1:] != self._parts[0][1].shape[1:]:
                raise InputError(f"frame shape {dset.shape[1:]} differs from the first data "
                                 f"file's {self._parts[0][1].shape[1:]}", where)
            self._parts.append((offset, dset, where))
            offset += int(dset.shape[0])
        self._use_frames(self._parts[0][1], n_frames=offset)
        # data files written with different dtypes (e.g. a run continued at another bit
        # depth): read all as one type that holds every part's values
        self.dtype = np.result_type(*[dset.dtype for _, dset, _ in self._parts])
        self.geometry = self._geometry(options, mask)

    def _geometry(self, options, mask_path):
        f = self._f
        det = f["entry/instrument/detector"] if "entry/instrument/detector" in f else None
        base = {}
        where = f"{self.path}:/entry/instrument/detector"
        if det is not None:
            if "x_pixel_size" in det:
                base["pixel_size"] = to_metres(det["x_pixel_size"], "m", where)
                if "y_pixel_size" in det:
                    y = to_metres(det["y_pixel_size"], "m", where)
                    if not np.isclose(y, base["pixel_size"], rtol=1e-3):
                        raise InputError(f"non-square pixels ({base['pixel_size']} x {y} m) are "
                                         "not supported", where)
            if "detector_distance" in det:
                base["distance"] = to_metres(det["detector_distance"], "m", where)
            elif "distance" in det:
                base["distance"] = to_metres(det["distance"], "m", where)
            if "beam_center_x" in det and "beam_center_y" in det:
                cx = self._center(det["beam_center_x"], base.get("pixel_size"), where)
                cy = self._center(det["beam_center_y"], base.get("pixel_size"), where)
                base["beam_center"] = (cy, cx)
        for p in ("entry/instrument/beam/incident_wavelength",
                  "entry/instrument/monochromator/wavelength"):
            if p in f:
                wl = to_metres(f[p], "angstrom", f"{self.path}:/{p}") * 1e10
                if wl > 0:
                    base["energy_ev"] = HC_EV_ANGSTROM / wl
                break
        else:
            p = "entry/instrument/beam/incident_energy"
            if p in f:
                e = to_ev(f[p], "eV", f"{self.path}:/{p}")
                if e > 0:
                    base["energy_ev"] = e
        g = geometry_from_options(self.frame_shape, options, self.path, base)
        if g is not None:
            pm = None
            for p in ("pixel_mask", "detectorSpecific/pixel_mask"):
                if det is not None and p in det:
                    pm = np.asarray(det[p][...])
                    break
            if pm is not None:
                if pm.shape != tuple(self.frame_shape):
                    raise InputError(f"pixel_mask shape {pm.shape} does not match frame shape "
                                     f"{tuple(self.frame_shape)}", where)
                g = apply_mask(g, pm == 0)
        return apply_mask(g, load_mask(mask_path, self.frame_shape))

    @staticmethod
    def _center(dset, pixel_size, where):
        if units_of(dset, "pixel").strip().lower() in ("pixel", "pixels", "px", ""):
            return first_value(dset)
        if not pixel_size:
            raise InputError("beam centre given as a length but no pixel size", where)
        return to_metres(dset, "m", where) / pixel_size

    def read(self, start, stop, out=None):
        start, stop = max(start, 0), min(stop, self.n_frames)
        stop = max(start, stop)
        shape = (stop - start,) + self.frame_shape
        if out is None or out.shape != shape or out.dtype != self.dtype:
            out = np.empty(shape, self.dtype)
        for offset, dset, where in self._parts:
            lo, hi = max(start, offset), min(stop, offset + dset.shape[0])
            if lo < hi:
                part = out[lo - start:hi - start]
                got = read_rows(dset, lo - offset, hi - offset, f"{where} frame {lo - offset}",
                                out=part if dset.dtype == self.dtype else None)
                if got is not part:
                    part[...] = got
        return out
