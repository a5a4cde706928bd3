"""Readers: one module per file format, one interface (:class:`FrameSource`).

``open_source(path, **options)`` detects the format of a file and returns a
:class:`FrameSource`, which gives frames in chunks (``read(start, stop)``), never a whole
file at once, plus the detector geometry, event numbers, per-frame extras and labels
where the file holds them.

Formats (module, detection):

============ ============================================================================
cxi          CXI (``lcls-dl simulate``, CXIDB, Cheetah/psocake multi-event CXI):
             ``/entry_1/data_1/data`` or ``/entry_1/instrument_1/detector_1/data``
nexus        NeXus NXmx master file (``/entry/data/data_NNNNNN`` links, Eiger/Jungfrau)
cheetah      Cheetah classic one-hit-per-file HDF5 (``/data/data`` or ``/data/rawdata``)
smalldata    psana smalldata flat per-event HDF5, SLAC ice/water ML ``data`` + ``label``
plain        any other HDF5: ``dataset=PATH`` or the single largest 3-D numeric dataset
tabular      ``.csv``/``.tsv`` and NetCDF (``.nc``) per-frame features or profiles
============ ============================================================================

Reader options (all keyword arguments, the CLI flags of ``lcls-dl ingest``):
``format`` (force a reader), ``dataset``, ``label_dataset``, ``pixel_size_um``,
``distance_mm``, ``energy_ev``, ``beam_center`` (ss, fs pixels), ``poni`` (pyFAI file),
``mask`` (HDF5/npy file, True/nonzero = good pixel), ``classes`` (names for integer labels).

Examples
--------
>>> src = open_source("run1/run0001.cxi")          # doctest: +SKIP
>>> src.n_frames, src.frame_shape                  # doctest: +SKIP
(200, (1480, 1552))
>>> chunk = src.read(0, 16)                        # doctest: +SKIP
"""
import glob
import os

import numpy as np

from ...errors import InputError

#: reader options every format accepts (the others are ignored by formats that need none)
READER_OPTIONS = ("format", "dataset", "label_dataset", "pixel_size_um", "distance_mm",
                  "energy_ev", "beam_center", "poni", "mask", "classes")
#: file name endings treated as HDF5 / tabular when expanding directories
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".cxi", ".nxs")
TABLE_SUFFIXES = (".csv", ".tsv", ".nc", ".nc4", ".netcdf")
FORMATS = ("cxi", "nexus", "cheetah", "smalldata", "plain", "tabular")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class FrameSource:
    """Frames of one input file.

    Attributes
    ----------
    path : str
        The file on disk.
    name : str
        The file relative to its input root (used in sample ids ``name:event``).
    reader : str
        Format name (one of :data:`FORMATS`).
    n_frames : int
    frame_shape : tuple of int
        One frame as stored: 2-D slab or 3-D module stack; ``()`` for tabular inputs.
    dtype : numpy.dtype
    geometry : DetectorGeometry or None
    events : ndarray of int64
        Event number of every frame (what ``file:event`` ids and label CSVs use).
    extra : dict of str -> ndarray
        Per-frame values the file holds (e.g. ``nPeaks``), each of length ``n_frames``.
    labels : list of str or None
        Per-frame label names (None = unlabeled frame) or None when the file has none.
    calibration : dict
        Detector calibration the file records (``adu_per_photon``, ``pedestal``), else {}.
    """

    reader = "base"
    tabular = False

    def __init__(self, path, name=None):
        self.path = os.fspath(path)
        self.name = name or os.path.basename(self.path)
        self.n_frames = 0
        self.frame_shape = ()
        self.dtype = np.dtype(np.float32)
        self.geometry = None
        self.events = np.zeros(0, np.int64)
        self.extra = {}
        self.labels = None
        self.calibration = {}

    def read(self, start, stop, out=None):
        """Frames ``start:stop`` as an array ``(stop - start, *frame_shape)``.

        ``out``, an array of that shape and ``self.dtype``, is filled and returned where
        the reader can (HDF5 frames datasets): reusing one buffer spares the page faults
        of fresh memory, which cost more than the read itself for CSPAD-size frames.
        Readers that cannot ignore it and return a new array.
        """
        raise InputError(f"reader {self.reader} cannot read frames", self.path)

    def close(self):
        """Release the file."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"{type(self).__name__}({self.name!r}, frames={self.n_frames}, "
                f"frame_shape={self.frame_shape})")

    def where(self, index=None):
        """``name`` or ``name:event`` of frame ``index`` for error messages."""
        if index is None or index >= len(self.events):
            return self.path
        return f"{self.path}:{int(self.events[index])}"


# -- helpers shared by the HDF5 readers -------------------------------------------------------
class HDF5Source(FrameSource):
    """Base of the HDF5 readers: one open file, frames in one dataset (``self._dset``).

    ``__init__`` opens the file and passes the reader options to the subclass's ``_open``;
    when ``_open`` raises, the file is closed again before the error propagates.
    """

    def __init__(self, path, name=None, **options):
        super().__init__(path, name)
        self._f = open_h5(self.path)
        try:
            self._open(**options)
        except BaseException:
            self._f.close()
            raise

    def _open(self, **options):
        raise InputError(f"reader {self.reader} cannot open files", self.path)

    def _use_frames(self, dset, frame_shape=None, n_frames=None):
        """Take ``dset`` (N, ...) as the frames; events are the frame indices 0..N-1.

        ``frame_shape`` and ``n_frames`` default to ``dset.shape[1:]`` and ``dset.shape[0]``
        (a reader that presents the data otherwise, e.g. one 2-D image, passes both).
        """
        self._dset = dset
        self.n_frames = int(dset.shape[0]) if n_frames is None else int(n_frames)
        self.frame_shape = tuple(dset.shape[1:]) if frame_shape is None else tuple(frame_shape)
        self.dtype = dset.dtype
        self.events = np.arange(self.n_frames, dtype=np.int64)

    def _flag_geometry(self, options, mask_path, base=None):
        """Geometry from the flags (over ``base``, see :func:`geometry_from_options`) + mask."""
        g = geometry_from_options(self.frame_shape, options, self.path, base)
        return apply_mask(g, load_mask(mask_path, self.frame_shape))

    def read(self, start, stop, out=None):
        return read_rows(self._dset, start, stop, self.where(start), out=out)

    def close(self):
        try:
            self._f.close()
        except Exception:  # already closed
            pass


def first_value(dset):
    """The first element of a (scalar or array) dataset as a float."""
    return float(np.asarray(dset[()]).reshape(-1)[0])


def positive_median(f, key):
    """Median of the finite positive values of dataset ``key`` (None if absent or none)."""
    if key not in f:
        return None
    values = np.asarray(f[key][...], float).reshape(-1)
    values = values[np.isfinite(values) & (values > 0)]
    return float(np.median(values)) if len(values) else None


def units_of(dset, default):
    """The ``units`` attribute of ``dset`` as a str (``default`` when it has none)."""
    units = dset.attrs.get("units", default)
    if isinstance(units, bytes):
        units = units.decode()
    if not isinstance(units, str):
        units = np.asarray(units).reshape(-1)[0]
        units = units.decode() if isinstance(units, bytes) else str(units)
    return units


def open_h5(path):
    """Open an HDF5 file read-only (compression plugins loaded) or raise InputError."""
    import h5py

    from ...hdf5_filters import register_filters

    register_filters()  # bitshuffle, LZ4, Blosc

    if not os.path.exists(path):
        raise InputError("no such file", path)
    if not is_hdf5(path):
        raise InputError("not an HDF5 file", path)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"cannot open HDF5 file (truncated or corrupt?): {_short(exc)}",
                         path) from None


def is_hdf5(path):
    """True if ``path`` starts with the HDF5 signature (at offset 0, 512, 1024, ...)."""
    try:
        with open(path, "rb") as fh:
            for offset in (0, 512, 1024, 2048):
                fh.seek(offset)
                if fh.read(8) == HDF5_SIGNATURE:
                    return True
    except OSError:
        return False
    return False


def _short(exc):
    return " ".join(str(exc).split())[:200]


def read_rows(dset, start, stop, where, frame_shape=None, out=None):
    """Read ``dset[start:stop]`` turning HDF5 failures into InputError (truncated data...).

    With ``out`` (C-contiguous, ``(stop - start, *dset.shape[1:])``, ``dset.dtype``) the
    rows are read into it and it is returned.
    """
    start, stop = max(int(start), 0), min(int(stop), int(dset.shape[0]))
    stop = max(start, stop)
    try:
        if (out is not None and out.shape == (stop - start,) + tuple(dset.shape[1:])
                and out.dtype == dset.dtype and out.flags.c_contiguous):
            if stop > start:
                dset.read_direct(out, np.s_[start:stop])
            data = out
        else:
            data = dset[start:stop]
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read frames {start}-{stop - 1}: {_short(exc)}",
                         where) from None
    if frame_shape is not None and data.shape[1:] != tuple(frame_shape):
        data = data.reshape((len(data),) + tuple(frame_shape))
    return data


def check_frames_dataset(dset, where, ndim=(3, 4)):
    """Check a frames dataset is numeric with ``ndim`` dimensions (N, ...)."""
    if not hasattr(dset, "shape"):
        raise InputError("not a dataset", where)
    if dset.dtype.kind not in "uif":
        raise InputError(f"frames dataset has non-numeric dtype {dset.dtype}", where)
    if dset.ndim not in ndim:
        need = " or ".join(f"{n}-D" for n in ndim)
        raise InputError(f"frames dataset is {dset.ndim}-D {tuple(dset.shape)}; need {need} "
                         "(frames, ...)", where)


def load_pixel_map(path, frame_shape, what, names):
    """A per-pixel array (``what``: mask, dark, gain) from ``.npy`` or HDF5, frame-shaped.

    HDF5: the first of the dataset ``names`` present, else the first dataset of >= 2
    dimensions. A flat array of the frame's size is reshaped. Raises InputError when the
    file is missing or unreadable or the array's shape differs from ``frame_shape``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{what} file not found", path)
    if path.endswith(".npy"):
        try:
            arr = np.load(path)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {what}: {_short(exc)}", path) from None
    else:
        with open_h5(path) as f:
            found = [n for n in names if n in f]
            if not found:
                found = [n for n, d in _datasets(f) if d.ndim >= 2]
            if not found:
                raise InputError(f"no {what} dataset in file", path)
            arr = f[found[0]][...]
    if tuple(arr.shape) != tuple(frame_shape):
        if arr.size == int(np.prod(frame_shape)) and arr.ndim != len(frame_shape):
            arr = arr.reshape(frame_shape)
        else:
            raise InputError(f"{what} shape {tuple(arr.shape)} does not match frame shape "
                             f"{tuple(frame_shape)}", path)
    return arr


def load_mask(path, frame_shape):
    """Load a mask file (HDF5 ``mask``/``data``/single dataset, ``.npy``) as bool, True = good.

    Raises InputError when the mask's shape differs from ``frame_shape``.
    """
    if path is None:
        return None
    return load_pixel_map(path, frame_shape, "mask",
                          ("mask", "data", "data/data", "pixel_mask")).astype(bool)


def load_calibration(path, frame_shape, what):
    """A per-pixel dark (ADU) or relative gain from ``.npy`` or HDF5 (dataset ``what``,
    ``data`` or the first 2-D+ one) as float64; non-finite values are an InputError."""
    arr = load_pixel_map(path, frame_shape, what, (what, "data", "data/data"))
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{what} is not numeric ({arr.dtype})", os.fspath(path))
    arr = arr.astype(np.float64)
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise InputError(f"{what} has {bad} non-finite pixels", os.fspath(path))
    return arr


def _datasets(group, prefix=""):
    """All (path, dataset) pairs under an h5py group, depth first, external links skipped."""
    import h5py

    out = []
    for key in group:
        try:
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                continue
            obj = group[key]
        except (KeyError, OSError):
            continue
        path = f"{prefix}{key}"
        if isinstance(obj, h5py.Dataset):
            out.append((path, obj))
        elif isinstance(obj, h5py.Group):
            out.extend(_datasets(obj, path + "/"))
    return out


def labels_from_array(values, classes=None, where=None):
    """Per-frame label names from a label array (strings, or integers indexing ``classes``).

    Negative integers and empty strings mean unlabeled (None).
    """
    from ..labels import DEFAULT_CLASSES

    values = np.asarray(values)
    if values.dtype.kind in "SOU":
        out = []
        for v in values.reshape(-1):
            v = v.decode() if isinstance(v, bytes) else str(v)
            out.append(v.strip() or None)
        return out
    if values.dtype.kind not in "iub" and not (values.dtype.kind == "f" and
                                                 np.all(np.mod(values, 1) == 0)):
        raise InputError(f"labels must be names or class indices, got dtype {values.dtype}",
                         where)
    names = list(classes or DEFAULT_CLASSES)
    out = []
    for v in values.reshape(-1).astype(np.int64):
        if v < 0:
            out.append(None)
        elif v >= len(names):
            raise InputError(f"label index {v} has no class name (classes: "
                             f"{','.join(names)}; give --classes)", where)
        else:
            out.append(names[v])
    return out


def geometry_from_options(frame_shape, options, where, base=None):
    """Geometry from ``pixel_size_um``/``distance_mm``/``energy_ev``/``beam_center``/``poni``.

    Values from flags override those in ``base`` (a dict of what the file says:
    ``pixel_size`` m, ``distance`` m, ``energy_ev``, ``beam_center`` (ss, fs) pixels).
    Returns None if neither the file nor the flags give enough to place the pixels.
    """
    from .. import geometry as geom

    if options.get("poni"):
        pixel = options.get("pixel_size_um")
        try:
            return geom.from_poni(options["poni"], frame_shape,
                                  pixel_size=None if pixel is None else pixel * 1e-6,
                                  energy_ev=options.get("energy_ev") or None)
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"cannot read PONI file: {_short(exc)}", options["poni"]) from None
    info = dict(base or {})
    if options.get("pixel_size_um") is not None:
        info["pixel_size"] = float(options["pixel_size_um"]) * 1e-6
    if options.get("distance_mm") is not None:
        info["distance"] = float(options["distance_mm"]) * 1e-3
    if options.get("energy_ev") is not None:
        info["energy_ev"] = float(options["energy_ev"])
    if options.get("beam_center") is not None:
        info["beam_center"] = tuple(float(v) for v in options["beam_center"])
    if len(frame_shape) != 2:
        return None
    if not all(info.get(k) for k in ("pixel_size", "distance", "energy_ev")):
        return None
    center = info.get("beam_center") or ((frame_shape[0] - 1) / 2.0, (frame_shape[1] - 1) / 2.0)
    for key, low in (("pixel_size", 0), ("distance", 0), ("energy_ev", 0)):
        if not np.isfinite(info[key]) or info[key] <= low:
            raise InputError(f"geometry value {key}={info[key]} must be positive", where)
    return geom.flat(tuple(frame_shape), info["pixel_size"], info["distance"],
                     info["energy_ev"], beam_center=center)


def apply_mask(geometry, mask):
    """``geometry`` with a user mask (True = good) combined into its mask (None stays None)."""
    if geometry is None or mask is None:
        return geometry
    return geometry.with_mask(mask)


# -- detection and opening --------------------------------------------------------------------
def detect_format(path, options=None):
    """Name of the reader for ``path`` (see module docstring), or raise InputError."""
    options = options or {}
    if options.get("format"):
        fmt = options["format"]
        if fmt not in FORMATS:
            raise InputError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})", path)
        return fmt
    if not os.path.exists(path):
        raise InputError("no such file or directory", path)
    lower = path.lower()
    if lower.endswith((".csv", ".tsv")):
        return "tabular"
    if not is_hdf5(path):
        if lower.endswith((".nc", ".nc4", ".netcdf")):
            return "tabular"  # NetCDF-3 classic files are not HDF5
        raise InputError("not an HDF5 file (nor a CSV/NetCDF table)", path)
    with open_h5(path) as f:
        if options.get("dataset"):
            return "smalldata" if options.get("label_dataset") else "plain"
        if lower.endswith((".nc", ".nc4", ".netcdf")) and not _has_3d(f):
            return "tabular"
        if "entry_1" in f:
            return "cxi"
        if "entry" in f and ("entry/data" in f or "entry/instrument" in f):
            return "nexus"
        if "data/data" in f or "data/rawdata" in f:
            return "cheetah"
        if "data" in f and "label" in f and not hasattr(f["data"], "keys"):
            return "smalldata"
        if "timestamp" in f or options.get("label_dataset"):
            return "smalldata"
    return "plain"


def _has_3d(f):
    return any(d.ndim == 3 and d.dtype.kind in "uif" for _, d in _datasets(f))


def open_source(path, name=None, **options):
    """Open ``path`` with the right reader and return a :class:`FrameSource`.

    Parameters
    ----------
    path : str
        An input file.
    name : str, optional
        The file's name relative to its input root (default: its base name).
    **options
        Reader options (see module docstring).

    Raises
    ------
    InputError
        Missing file, not HDF5, truncated, missing dataset, wrong dimensions, mask shape.
    """
    path = os.fspath(path)
    fmt = detect_format(path, options)
    if fmt == "cxi":
        from .cxi import CXISource as cls
    elif fmt == "nexus":
        from .nexus import NexusSource as cls
    elif fmt == "cheetah":
        from .cheetah import CheetahSource as cls
    elif fmt == "smalldata":
        from .smalldata import SmalldataSource as cls
    elif fmt == "tabular":
        from .tabular import TabularSource as cls
    else:
        from .plain import PlainSource as cls
    return cls(path, name=name, **{k: v for k, v in options.items() if k != "format"})


def expand_inputs(inputs):
    """Expand files, directories and globs into a sorted list of ``(path, name)``.

    ``name`` is the file relative to its input root: a file's base name, a path below a
    directory input, a path below the non-wildcard part of a glob. Directories are searched
    recursively for HDF5/CXI/NeXus files (``*_data_NNNNNN.h5`` files of a NeXus master in
    the same folder are left to the master); tables (CSV, NetCDF) are read only when named
    (a file or a glob), so a run directory's ``truth.csv`` is not mistaken for data.

    Raises InputError for a path that does not exist, a glob or directory without any input,
    or two inputs with the same name.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found = []
    for item in inputs:
        item = os.fspath(item)
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            root = _glob_root(item)
            files = []
            for m in matches:
                if os.path.isdir(m):
                    files.extend(_walk(m, root))
                else:
                    files.append((m, os.path.relpath(m, root)))
            if not files:
                raise InputError("no input files match", item)
            found.extend(files)
        elif os.path.isdir(item):
            files = _walk(item, item)
            if not files:
                raise InputError("no HDF5/CXI/NeXus files in directory (name tables "
                                 "explicitly)", item)
            found.extend(files)
        elif os.path.exists(item):
            found.append((item, os.path.basename(item)))
        else:
            raise InputError("no such file or directory", item)
    found = _drop_nexus_data_files(found)
    found.sort(key=lambda pn: (pn[1], pn[0]))
    seen = {}
    for path, name in found:
        real = os.path.realpath(path)
        if name in seen and seen[name] != real:
            raise InputError(f"two inputs have the same name {name!r} (ids would collide); "
                             "give their common parent directory instead", path)
        seen[name] = real
    unique, done = [], set()
    for path, name in found:
        if name not in done:
            done.add(name)
            unique.append((path, name))
    return unique


def _glob_root(pattern):
    parts = []
    for part in pattern.split(os.sep):
        if glob.has_magic(part):
            break
        parts.append(part)
    root = os.sep.join(parts)
    if pattern.startswith(os.sep) and not root:
        root = os.sep
    return root or "."


def _walk(directory, root):
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            if fn.lower().endswith(HDF5_SUFFIXES):
                p = os.path.join(dirpath, fn)
                out.append((p, os.path.relpath(p, root)))
    return out


def _drop_nexus_data_files(found):
    """Leave NeXus ``*_data_NNNNNN.h5`` files to their ``*_master.h5`` in the same folder."""
    import re

    masters = {os.path.join(os.path.dirname(p), os.path.basename(p)[:-len("_master.h5")])
               for p, _ in found if p.endswith("_master.h5")}
    keep = []
    for p, n in found:
        m = re.match(r"(.*)_data_\d{6}\.h5$", p)
        if m and m.group(1) in masters:
            continue
        keep.append((p, n))
    return keep
