"""psana smalldata-style flat per-event HDF5, and SLAC's ice/water ML ``data`` + ``label`` set.

smalldata files hold one dataset per per-event quantity, all with the event as first axis
(nested keys become groups ``a/b``), usually chunked with ``maxshape=(None, ...)``::

    /timestamp                  (N,)
    /jungfrau4M/calib           (N, ss, fs)     <- frames (``dataset``, or the largest 3-D)
    /ipm2/sum, /gas_detector/f_11_ENRC ...      (N,)  -> ``extra``

The ML layout is ``/data`` (N, ss, fs) frames + ``/label`` (N,) names or class indices
(``label_dataset`` chooses another; integer labels index ``classes``, default
water, ice, miss; negative = unlabeled). Geometry from the flags or ``poni``.
"""
import numpy as np

from ...errors import InputError
from . import (FrameSource, _datasets, apply_mask, check_frames_dataset, geometry_from_options,
               labels_from_array, load_mask, open_h5, read_rows)
from .plain import find_frames_dataset


class SmalldataSource(FrameSource):
    """Frames, per-event values and labels of a flat per-event HDF5 file."""

    reader = "smalldata"

    def __init__(self, path, name=None, dataset=None, label_dataset=None, mask=None,
                 classes=None, **options):
        super().__init__(path, name)
        self._f = open_h5(self.path)
        try:
            f = self._f
            key = find_frames_dataset(f, self.path, dataset)
            self._dset = f[key]
            check_frames_dataset(self._dset, f"{self.path}:/{key}", ndim=(3,))
            n = self.n_frames = int(self._dset.shape[0])
            self.frame_shape = tuple(self._dset.shape[1:])
            self.dtype = self._dset.dtype
            self.events = np.arange(n, dtype=np.int64)
            lkey = label_dataset.lstrip("/") if label_dataset else ("label" if "label" in f
                                                                    else None)
            if label_dataset and lkey not in f:
                raise InputError(f"no label dataset {label_dataset} in file", self.path)
            for p, d in _datasets(f):
                if p in (key, lkey) or d.ndim != 1 or d.shape[0] != n or d.dtype.kind not in "uifb":
                    continue
                self.extra[p] = d[...]
            if lkey is not None:
                lab = f[lkey]
                if lab.ndim != 1 or lab.shape[0] != n:
                    raise InputError(f"label dataset has shape {lab.shape}, need ({n},)",
                                     f"{self.path}:/{lkey}")
                self.labels = labels_from_array(lab[...], classes, f"{self.path}:/{lkey}")
            self.geometry = geometry_from_options(self.frame_shape, options, self.path)
            self.geometry = apply_mask(self.geometry, load_mask(mask, self.frame_shape))
        except BaseException:
            self._f.close()
            raise

    def read(self, start, stop):
        return read_rows(self._dset, start, stop, self.where(start))

    def close(self):
        try:
            self._f.close()
        except Exception:  # already closed
            pass
