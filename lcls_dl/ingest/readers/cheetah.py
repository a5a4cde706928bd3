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
from . import HDF5Source, apply_mask, first_value, load_mask
from .cxi import CSPAD_SLAB
from .nexus import HC_EV_ANGSTROM


class CheetahSource(HDF5Source):
    """One Cheetah hit file (see module docstring)."""

    reader = "cheetah"

    def _open(self, dataset=None, mask=None, classes=None, **options):
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
        dset = f[key]
        where = f"{self.path}:/{key}"
        if not hasattr(dset, "shape") or dset.dtype.kind not in "uif":
            raise InputError("frames dataset is not numeric", where)
        if dset.ndim == 2:
            self._single = True
            self._use_frames(dset, frame_shape=dset.shape, n_frames=1)
        elif dset.ndim == 3:
            self._single = False
            self._use_frames(dset)
        else:
            raise InputError(f"frames dataset is {dset.ndim}-D; need a 2-D image or (N, ss, fs)",
                             where)
        energy = distance = None
        if "LCLS/photon_energy_eV" in f:
            energy = first_value(f["LCLS/photon_energy_eV"])
        elif "LCLS/photon_wavelength_A" in f:
            wl = first_value(f["LCLS/photon_wavelength_A"])
            energy = HC_EV_ANGSTROM / wl if wl > 0 else None
        if "LCLS/detectorPosition" in f:
            distance = first_value(f["LCLS/detectorPosition"]) * 1e-3
        for k in ("photon_energy_eV", "detectorPosition", "fiducial"):
            if f"LCLS/{k}" in f:
                self.extra[k] = np.full(self.n_frames, first_value(f[f"LCLS/{k}"]))
        if self.frame_shape == CSPAD_SLAB and not options.get("poni") \
                and options.get("pixel_size_um") is None:
            d = options["distance_mm"] * 1e-3 if options.get("distance_mm") else distance
            e = options.get("energy_ev") or energy
            if not d or not e:
                raise InputError("CSPAD slab without detector distance or photon energy; give "
                                 "--distance-mm and --energy-ev", self.path)
            self.geometry = apply_mask(geom.cspad(distance=d, energy_ev=e, layout="slab"),
                                       load_mask(mask, self.frame_shape))
        else:
            self.geometry = self._flag_geometry(options, mask,
                                                {"distance": distance, "energy_ev": energy})

    def read(self, start, stop, out=None):
        if not self._single:
            return super().read(start, stop, out=out)
        if min(stop, self.n_frames) <= max(start, 0):
            return np.zeros((0,) + self.frame_shape, self.dtype)
        try:
            return self._dset[...][None]
        except (OSError, RuntimeError) as exc:
            raise InputError(f"cannot read frame: {' '.join(str(exc).split())}",
                             self.where(0)) from None
