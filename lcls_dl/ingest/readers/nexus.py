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
lengths, angstrom for the wavelength); beam centres are in pixels unless their ``units`` is a
length. ``pixel_mask`` follows NXmx: 0 = good pixel. The frames of all links form one
sequence in link-name order; event numbers run 0..N-1 over it.
"""
import os

import numpy as np

from ...errors import InputError
from . import (FrameSource, apply_mask, check_frames_dataset, geometry_from_options, load_mask,
               open_h5, read_rows)

HC_EV_ANGSTROM = 12398.419843320026
_LENGTH = {"m": 1.0, "meter": 1.0, "meters": 1.0, "metre": 1.0, "cm": 1e-2, "mm": 1e-3,
           "millimeter": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6, "microns": 1e-6,
           "micrometer": 1e-6, "nm": 1e-9, "nanometer": 1e-9, "angstrom": 1e-10, "a": 1e-10,
           "å": 1e-10, "ang": 1e-10}


def to_metres(dset, default="m", where=None):
    """Value of a scalar dataset in metres, honoring its ``units`` attribute."""
    value = float(np.asarray(dset[()]).reshape(-1)[0])
    units = dset.attrs.get("units", default)
    if isinstance(units, bytes):
        units = units.decode()
    units = str(np.asarray(units).reshape(-1)[0] if not isinstance(units, str) else units)
    factor = _LENGTH.get(units.strip().lower())
    if factor is None:
        raise InputError(f"unknown length units {units!r}", where)
    return value * factor


class NexusSource(FrameSource):
    """Frames of an NXmx master file and its linked data files."""

    reader = "nexus"

    def __init__(self, path, name=None, dataset=None, mask=None, classes=None, **options):
        super().__init__(path, name)
        self._f = open_h5(self.path)
        try:
            self._open(dataset, mask, options)
        except BaseException:
            self._f.close()
            raise

    def _open(self, dataset, mask_path, options):
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
        self.n_frames = offset
        self.frame_shape = tuple(self._parts[0][1].shape[1:])
        self.dtype = self._parts[0][1].dtype
        self.events = np.arange(self.n_frames, dtype=np.int64)
        self.geometry = self._geometry(options)
        self.geometry = apply_mask(self.geometry, load_mask(mask_path, self.frame_shape))

    def _geometry(self, options):
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
        return g

    @staticmethod
    def _center(dset, pixel_size, where):
        units = dset.attrs.get("units", "pixel")
        units = units.decode() if isinstance(units, bytes) else str(units)
        if units.strip().lower() in ("pixel", "pixels", "px", ""):
            return float(np.asarray(dset[()]).reshape(-1)[0])
        if not pixel_size:
            raise InputError("beam centre given as a length but no pixel size", where)
        return to_metres(dset, "m", where) / pixel_size

    def read(self, start, stop):
        out = np.empty((stop - start,) + self.frame_shape, self.dtype)
        for offset, dset, where in self._parts:
            lo, hi = max(start, offset), min(stop, offset + dset.shape[0])
            if lo < hi:
                out[lo - start:hi - start] = read_rows(dset, lo - offset, hi - offset,
                                                       f"{where} frame {lo - offset}")
        return out

    def close(self):
        try:
            self._f.close()
        except Exception:  # already closed
            pass
