"""Cheetah classic HDF5: one hit per file (``LCLS_<date>_r<run>_<time>_<fiducial>_cspad.h5``).

::

    /data/rawdata               (1480, 1552) CSPAD raw slab (preferred: known geometry)
    /data/data                  assembled image (ss, fs), or the raw slab in older files
    /LCLS/photon_energy_eV      eV
    /LCLS/detectorPosition      mm, the camera-length encoder (distance = value + offset)

Each file is one frame (event 0). A raw slab gets the CSPAD geometry at the encoder
distance (``distance_mm`` overrides; Cheetah's encoder offset is experiment specific, so pass
``--distance-mm`` when the encoder is not the sample distance); an assembled image needs the
geometry flags (``--pixel-size-um`` etc. or ``--poni``). A stack ``(N, ss, fs)`` in
``/data/data`` is read as N frames.
"""
import numpy as np

from ...errors import InputError
from . import FrameSource, apply_mask, geometry_from_options, load_mask, open_h5, read_rows
from .cxi import CSPAD_SLAB


class CheetahSource(FrameSource):
    """One Cheetah hit file (see module docstring)."""

    reader = "cheetah"

    def __init__(self, path, name=None, dataset=None, mask=None, classes=None, **options):
        super().__init__(path, name)
        self._f = open_h5(self.path)
        try:
            self._open(dataset, mask, options)
        except BaseException:
            self._f.close()
            raise

    def _open(self, dataset, mask_path, options):
        from .. import geometry as geom

        f = self._f
        if dataset:
            key = dataset.lstrip("/")
        elif "data/rawdata" in f:
            key = "data/rawdata"
        else:
            key = "data/data"
        if key not in f:
            raise InputError(f"no dataset /{key} in Cheetah file", self.path)
        dset = self._dset = f[key]
        where = f"{self.path}:/{key}"
        if not hasattr(dset, "shape") or dset.dtype.kind not in "uif":
            raise InputError("frames dataset is not numeric", where)
        if dset.ndim == 2:
            self._single = True
            self.n_frames, self.frame_shape = 1, tuple(dset.shape)
        elif dset.ndim == 3:
            self._single = False
            self.n_frames, self.frame_shape = int(dset.shape[0]), tuple(dset.shape[1:])
        else:
            raise InputError(f"frames dataset is {dset.ndim}-D; need a 2-D image or (N, ss, fs)",
                             where)
        self.dtype = dset.dtype
        self.events = np.arange(self.n_frames, dtype=np.int64)
        energy = distance = None
        if "LCLS/photon_energy_eV" in f:
            energy = float(np.asarray(f["LCLS/photon_energy_eV"][()]).reshape(-1)[0])
        elif "LCLS/photon_wavelength_A" in f:
            wl = float(np.asarray(f["LCLS/photon_wavelength_A"][()]).reshape(-1)[0])
            energy = 12398.419843320026 / wl if wl > 0 else None
        if "LCLS/detectorPosition" in f:
            distance = float(np.asarray(f["LCLS/detectorPosition"][()]).reshape(-1)[0]) * 1e-3
        for k in ("photon_energy_eV", "detectorPosition", "fiducial"):
            if f"LCLS/{k}" in f:
                self.extra[k] = np.full(self.n_frames,
                                        float(np.asarray(f[f"LCLS/{k}"][()]).reshape(-1)[0]))
        if self.frame_shape == CSPAD_SLAB and not options.get("poni") \
                and options.get("pixel_size_um") is None:
            d = options["distance_mm"] * 1e-3 if options.get("distance_mm") else distance
            e = options.get("energy_ev") or energy
            if not d or not e:
                raise InputError("CSPAD slab without detector distance or photon energy; give "
                                 "--distance-mm and --energy-ev", self.path)
            self.geometry = geom.cspad(distance=d, energy_ev=e, layout="slab")
        else:
            self.geometry = geometry_from_options(
                self.frame_shape, options, self.path, {"distance": distance, "energy_ev": energy})
        self.geometry = apply_mask(self.geometry, load_mask(mask_path, self.frame_shape))

    def read(self, start, stop):
        if self._single:
            if start >= stop:
                return np.zeros((0,) + self.frame_shape, self.dtype)
            try:
                return self._dset[...][None]
            except (OSError, RuntimeError) as exc:
                raise InputError(f"cannot read frame: {' '.join(str(exc).split())}",
                                 self.where(0)) from None
        return read_rows(self._dset, start, stop, self.where(start))

    def close(self):
        try:
            self._f.close()
        except Exception:  # already closed
            pass
