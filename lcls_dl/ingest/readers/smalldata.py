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
from ...errors import InputError
from . import _datasets, labels_from_array
from .plain import PlainSource


class SmalldataSource(PlainSource):
    """Frames, per-event values and labels of a flat per-event HDF5 file."""

    reader = "smalldata"

    def _open(self, dataset=None, label_dataset=None, mask=None, classes=None, **options):
        f = self._f
        key = self._open_frames(dataset)
        n = self.n_frames
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
        self.geometry = self._flag_geometry(options, mask)
