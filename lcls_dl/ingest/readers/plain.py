"""Plain HDF5: frames in one 3-D dataset, geometry from flags or a PONI file.

The frames dataset is ``dataset=PATH`` (``--dataset``) or, when the file holds exactly one
largest 3-D numeric dataset, that one (two candidates of the same size -> InputError
naming them). Frames are ``(N, ss, fs)``. The geometry comes from ``pixel_size_um``,
``distance_mm``, ``energy_ev``, ``beam_center`` (default: the frame centre) or ``poni``
(pyFAI); the mask from ``mask`` (True/nonzero = good pixel). Events are frame indices.
"""
import numpy as np

from ...errors import InputError
from . import HDF5Source, _datasets, check_frames_dataset


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
        names = ", ".join("/" + p for p in top)
        raise InputError(f"several 3-D datasets could hold the frames ({names}); "
                         "choose one with --dataset", path)
    return top[0]


class PlainSource(HDF5Source):
    """Frames of a plain HDF5 file (see module docstring)."""

    reader = "plain"

    def _open(self, dataset=None, mask=None, classes=None, label_dataset=None, **options):
        self._open_frames(dataset)
        self.geometry = self._flag_geometry(options, mask)

    def _open_frames(self, dataset):
        """Find (:func:`find_frames_dataset`), check and use the 3-D frames dataset."""
        key = find_frames_dataset(self._f, self.path, dataset)
        check_frames_dataset(self._f[key], f"{self.path}:/{key}", ndim=(3,))
        self._use_frames(self._f[key])
        return key
