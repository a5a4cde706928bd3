"""Plain HDF5: frames in one 3-D dataset, geometry from flags or a PONI file.

The frames dataset is ``dataset=PATH`` (``--dataset``) or, when the file holds exactly one
largest 3-D numeric dataset, that one (two candidates of the same size -> InputError
naming them). Frames are ``(N, ss, fs)``. The geometry comes from ``pixel_size_um``,
``distance_mm``, ``energy_ev``, ``beam_center`` (default: the frame centre) or ``poni``
(pyFAI); the mask from ``mask`` (True/nonzero = good pixel). Events are frame indices.
"""
import numpy as np

from ...errors import InputError
from . import (FrameSource, _datasets, apply_mask, check_frames_dataset, geometry_from_options,
               load_mask, open_h5, read_rows)


def find_frames_dataset(f, path, dataset=None):
    """The frames dataset of an HDF5 file: ``dataset`` or the single largest 3-D numeric one."""
    if dataset:
        key = dataset.lstrip("/")
        if key not in f:
            raise InputError(f"no dataset {dataset} in file", path)
        return key
    cands = [(p, d) for p, d in _datasets(f) if d.ndim == 3 and d.dtype.kind in "uif"]
    if not cands:
        twod = [p for p, d in _datasets(f) if d.ndim == 2 and d.dtype.kind in "uif"]
        hint = f" (2-D datasets: {', '.join('/' + p for p in twod[:3])}; frames must be " \
               "(N, ss, fs))" if twod else ""
        raise InputError(f"no 3-D numeric frames dataset in file{hint}; give --dataset", path)
    sizes = [int(np.prod(d.shape)) for _, d in cands]
    best = max(sizes)
    top = [p for (p, _), s in zip(cands, sizes) if s == best]
    if len(top) > 1:
        raise InputError(f"several 3-D datasets could hold the frames ({', '.join('/' + p for p in top)});"
                         " choose one with --dataset", path)
    return top[0]


class PlainSource(FrameSource):
    """Frames of a plain HDF5 file (see module docstring)."""

    reader = "plain"

    def __init__(self, path, name=None, dataset=None, mask=None, classes=None,
                 label_dataset=None, **options):
        super().__init__(path, name)
        self._f = open_h5(self.path)
        try:
            key = find_frames_dataset(self._f, self.path, dataset)
            self._dset = self._f[key]
            check_frames_dataset(self._dset, f"{self.path}:/{key}", ndim=(3,))
            self.n_frames = int(self._dset.shape[0])
            self.frame_shape = tuple(self._dset.shape[1:])
            self.dtype = self._dset.dtype
            self.events = np.arange(self.n_frames, dtype=np.int64)
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
