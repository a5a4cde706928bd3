"""The ingest pipeline: input files -> preprocessed shards + manifest.json, on 1 or N ranks.

Plan (rank 0, before anything is written)
    Expand the inputs (files, directories, globs; sorted by name), open every file with its
    reader (format, shapes, geometry, mask checked), join the labels CSV, and lay all frames
    out in one global list ``(file, event)`` in that order. The list is cut into shards of
    ``shard_size`` frames, so shard ``k``'s content depends only on the inputs and parameters,
    never on the number of ranks. A *spec hash* covers inputs (name, size, mtime), reader
    options, preprocessing parameters, shard size, labels and classes; shard ``k``'s key is
    ``sha256(spec, k)`` and is stored in the shard's attributes.
Work (every rank)
    The shards still to do are dealt round-robin over ranks (rank ``r`` takes ``todo[r::N]``).
    Frames are read ``chunk_size`` at a time (memory bounded by one shard's outputs), then
    preprocessed, and the shard is written atomically to a staging directory next to
    DATASET_DIR (``.<name>.lcls-dl-staging-<spec>/``). After every shard all ranks agree on an
    error flag, so a bad frame on any rank stops every rank (no hang) with the error on rank 0.
Finish (rank 0)
    Only when every shard is done: the old manifest is removed, staged shards are moved into
    DATASET_DIR, shards left over from an older, larger dataset are removed, and
    ``manifest.json`` is written last. The staging directory is removed.

Resume and bad input
    A run that is killed leaves DATASET_DIR as it was; its finished shards stay in the
    staging directory and a re-run with the same spec keeps them (their key attribute
    matches) and does the rest. A re-run of a complete dataset with the same spec keeps
    every shard (nothing to do). DATASET_DIR holding a dataset built from *other* inputs or
    parameters is refused unless ``force=True``, which rebuilds every shard; the old dataset
    stays readable until the new manifest replaces it. ``labels.jsonl`` (human labels) is
    never touched. A bad input (InputError) found while planning writes nothing; one found
    while working removes the staging directory and leaves DATASET_DIR as it was. With
    ``skip_bad=True`` unreadable files and bad frames (e.g. NaN pixels) are skipped and listed
    in ``manifest["bad"]``.
"""
import hashlib
import json
import logging
import math
import os
import shutil

import numpy as np

from ..atomic import write_json
from ..errors import InputError, LclsError
from .labels import class_list, join_labels, label_indices, read_labels_csv
from .manifest import build_manifest
from .readers import READER_OPTIONS, expand_inputs, load_calibration, open_source
from .shard_writer import file_sha256, shard_name, write_shard

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1000
DEFAULT_CHUNK_SIZE = 32
SPEC_VERSION = 1
SHARD_KEY_ATTR = "lcls_dl_shard_key"


class PeerError(LclsError):
    """Another rank failed; this rank stops quietly (rank 0 reports the error)."""

    quiet = True


# -- small helpers ----------------------------------------------------------------------------
def idle_barrier(comm, poll=0.005):
    """Barrier that sleeps while waiting instead of spinning (MPI busy-polls by default).

    Ranks that finish their share early would otherwise burn a core the others need.
    """
    import time

    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(poll)


def _sha(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_stamp(path):
    st = os.stat(path)
    return {"bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _clean_options(options):
    out = {}
    for k, v in options.items():
        if k not in READER_OPTIONS:
            raise TypeError(f"unknown reader option {k!r}")
        if v is None or v == () or v == []:
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def staging_dir(out_dir, spec):
    """The staging directory of a run: a hidden sibling of ``out_dir`` named by the spec."""
    out_dir = os.path.abspath(out_dir)
    return os.path.join(os.path.dirname(out_dir),
                        f".{os.path.basename(out_dir)}.lcls-dl-staging-{spec[:16]}")


def _params_obj(params):
    from .preprocess import PreprocessParams

    if params is None:
        return PreprocessParams()
    if isinstance(params, dict):
        import dataclasses

        names = {f.name for f in dataclasses.fields(PreprocessParams)}
        return PreprocessParams.from_dict({k: v for k, v in params.items() if k in names})
    return params


#: per-pixel calibration files of PreprocessParams: (what, params field)
CALIBRATION_FILES = (("dark", "dark_file"), ("gain", "gain_file"))


def load_calibrations(params, frame_shape, checksums=None):
    """``{"dark": array, "gain": array}`` for the files ``params`` names (absent: not named).

    ``checksums`` (``{"dark": sha256, ...}``, recorded at ingest): a file whose contents
    changed since is an InputError, so predict never applies another calibration.
    """
    out = {}
    for what, field in CALIBRATION_FILES:
        path = getattr(params, field, None)
        if not path:
            continue
        arr = load_calibration(path, frame_shape, what)
        expected = (checksums or {}).get(what)
        if expected and file_sha256(path) != expected:
            raise InputError(f"{what} file changed since the dataset was ingested (sha256 "
                             "differs)", path)
        out[what] = arr
    return out


def calibration_checksums(params, frame_shape):
    """Check the calibration files ``params`` names; return ``{what: sha256}``."""
    load_calibrations(params, frame_shape)  # shape, readability, finite values
    return {what: file_sha256(getattr(params, field)) for what, field in CALIBRATION_FILES
            if getattr(params, field, None)}


def make_preprocessor(geometry, params, checksums=None):
    """A ``FramePreprocessor`` for a geometry (q/phi maps, mask and panel ids computed once).

    Peaks never join pixels of different panels (e.g. the ASICs of a CSPAD slab). A dark
    or gain file named by ``params`` is loaded (see :func:`load_calibrations`).
    """
    from .preprocess import FramePreprocessor

    panel_ids = None
    if len(geometry.frame_shape) == 2 and len(geometry.panels) > 1:
        panel_ids = np.full(geometry.frame_shape, -1, np.int32)
        for j, panel in enumerate(geometry.panels):
            panel_ids[panel.index()] = j
    calib = load_calibrations(params, geometry.frame_shape, checksums)
    return FramePreprocessor(geometry.q_map(), geometry.phi_map(), geometry.mask, params,
                             panel_ids=panel_ids, dark=calib.get("dark"), gain=calib.get("gain"))


#: default hit criterion of ``drop_misses`` (recorded in the manifest's parameters)
HIT_MIN_PEAKS = 8
HIT_MIN_RING_PHOTONS = 0.2


def hit_flags(scalars, scalar_names, min_peaks=HIT_MIN_PEAKS,
              min_ring_photons=HIT_MIN_RING_PHOTONS):
    """True per frame for a hit: ``n_peaks >= min_peaks`` (ice, spots) or a water ring with
    ``min_ring_photons`` mean photons per pixel in the S1 window (liquid droplet).

    Examples
    --------
    >>> names = ["n_peaks", "log10_ring_mean"]
    >>> hit_flags(np.array([[0, -2.0], [9, -2.0], [0, 0.3]]), names).tolist()
    [False, True, True]
    """
    names = list(scalar_names)
    scalars = np.asarray(scalars)
    peaks = scalars[:, names.index("n_peaks")]
    ring = 10.0 ** scalars[:, names.index("log10_ring_mean")]
    return (peaks >= min_peaks) | (ring >= min_ring_photons)


class _Preprocessors:
    """One preprocessor per distinct geometry (files of one run share it)."""

    def __init__(self, params, checksums=None):
        self.params = params
        self.checksums = checksums
        self._cache = {}

    def get(self, geometry):
        key = _sha(geometry.to_dict())
        pre = self._cache.get(key)
        if pre is None:
            if len(self._cache) > 8:
                self._cache.clear()
            pre = self._cache[key] = make_preprocessor(geometry, self.params, self.checksums)
        return pre


def _process(pre, frames, where_of, skip_bad, bad):
    """Preprocess a chunk; with ``skip_bad`` drop bad frames (recorded in ``bad``).

    Returns (out dict, kept indices into ``frames``).
    """
    where = [where_of(i) for i in range(len(frames))]
    try:
        return pre.batch(frames, where), np.arange(len(frames))
    except InputError:
        if not skip_bad:
            raise
    # find the bad frame(s): one at a time
    outs, kept = [], []
    for i in range(len(frames)):
        try:
            outs.append(pre.batch(frames[i:i + 1], where[i:i + 1]))
            kept.append(i)
        except InputError as exc:
            bad.append({"where": exc.where or where[i], "what": exc.what})
    if not outs:
        return None, np.zeros(0, np.int64)
    out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return out, np.asarray(kept, np.int64)


# -- planning ---------------------------------------------------------------------------------
def plan_ingest(inputs, out_dir, labels_csv=None, shard_size=DEFAULT_SHARD_SIZE,
                skip_bad=False, drop_misses=False, force=False, params=None, classes=None,
                hit_min_peaks=HIT_MIN_PEAKS, hit_min_ring_photons=HIT_MIN_RING_PHOTONS,
                **reader_options):
    """Check every input and decide what to do; writes nothing.

    Returns a dict (picklable, broadcast to all ranks): ``sources``, ``bad``, ``segments``
    (per shard a list of ``(source index, start, stop, global index of start)``), ``labels`` (int16 per frame),
    ``classes``, ``spec``, ``todo`` (shard numbers to compute), ``keep`` (summaries of shards
    kept from a previous run), ``staging``, ``geometry``, ``preprocessing``, ``tabular``...
    Raises InputError (bad input) or ConfigError (DATASET_DIR holds another dataset).
    """
    from ..errors import ConfigError

    if shard_size < 1:
        raise LclsError(f"shard size must be >= 1, got {shard_size}", "--shard-size")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError("output exists and is not a directory", out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise InputError("cannot write the dataset here (parent directory missing or not "
                         "writable)", out_dir)
    options = _clean_options(reader_options)
    if classes:
        options["classes"] = list(classes)  # names of integer labels in files
    params = _params_obj(params)
    files = expand_inputs(inputs)
    out_abs = os.path.abspath(out_dir)
    sources, bad, geoms, calibrations = [], [], [], []
    for path, name in files:
        if os.path.abspath(path).startswith(out_abs + os.sep):
            continue  # never ingest our own output
        try:
            src = open_source(path, name=name, **options)
        except InputError as exc:
            if not skip_bad:
                raise
            bad.append({"where": exc.where or path, "what": exc.what})
            continue
        try:
            if not src.tabular and src.geometry is None:
                raise InputError("no detector geometry: give --pixel-size-um, --distance-mm and "
                                 "--energy-ev (or --poni)", path)
            if src.n_frames == 0:
                log.warning("no frames in %s", path)
            entry = {"path": path, "name": src.name, "reader": src.reader,
                     "frames": int(src.n_frames), "frame_shape": list(src.frame_shape),
                     "events": src.events.copy(), "labels": src.labels,
                     "tabular": bool(src.tabular), **_file_stamp(path)}
            if src.tabular:
                entry["scalar_names"] = list(src.scalar_names)
                entry["profile_q"] = None if src.profile_q is None else \
                    [float(q) for q in src.profile_q]
                geoms.append(None)
            else:
                geoms.append(src.geometry.to_dict())
            calibrations.append((src.name, dict(src.calibration)))
            sources.append(entry)
        except InputError as exc:
            if not skip_bad:
                raise
            bad.append({"where": exc.where or path, "what": exc.what})
        finally:
            src.close()
    if not sources:
        raise InputError("no readable input files", ", ".join(map(str, inputs)))
    tab = {s["tabular"] for s in sources}
    if len(tab) > 1:
        raise InputError("cannot mix tables (CSV/NetCDF) with detector images in one dataset",
                         ", ".join(s["path"] for s in sources if s["tabular"])[:200])
    tabular = tab.pop()
    if tabular:
        first = sources[0]
        for s in sources[1:]:
            if s["scalar_names"] != first["scalar_names"] or \
                    s["frame_shape"] != first["frame_shape"]:
                raise InputError("table columns differ from the first table's "
                                 f"({first['path']})", s["path"])
        if drop_misses:
            raise LclsError("--drop-misses needs detector images (tables have no hit finder)")
    # frames and labels
    frame_files = [s["name"] for s in sources for _ in range(s["frames"])]
    frame_events = np.concatenate([s["events"] for s in sources]) if sources else np.zeros(0)
    names = []
    for s in sources:
        names.extend(s["labels"] if s["labels"] is not None else [None] * s["frames"])
    labels_meta = None
    if labels_csv is not None:
        rows = read_labels_csv(labels_csv)
        if bad:
            bad_names = {os.path.basename(str(b["where"]).split(":")[0]) for b in bad}
            rows = [r for r in rows if r[0] is None or os.path.basename(r[0]) not in bad_names]
        csv_names = join_labels(rows, frame_files, frame_events, where=os.fspath(labels_csv))
        names = [c if c is not None else n for c, n in zip(csv_names, names)]
        labels_meta = {"path": os.fspath(labels_csv), "sha256": file_sha256(labels_csv)}
    if classes:
        allowed = set(c.strip() for c in classes)
        for i, name in enumerate(names):
            if name is not None and name not in allowed:
                raise InputError(f"unknown label name {name!r} (classes: {','.join(classes)})",
                                 f"{os.fspath(labels_csv or 'labels')}: "
                                 f"{frame_files[i]}:{int(frame_events[i])}")
    classes = class_list(names, classes, where=os.fspath(labels_csv or "labels"))
    labels = label_indices(names, classes)
    params = _apply_calibration(params, calibrations)
    # preprocessing description
    if tabular:
        preprocessing = {"tabular": True, "scalar_names": sources[0]["scalar_names"],
                         "q_edges": None, "profile_q": sources[0]["profile_q"],
                         "image_shape": [0, 0]}
    else:
        preprocessing = dict(params.to_dict())
        preprocessing["tabular"] = False
        preprocessing["q_edges"] = [float(q) for q in params.q_edges()]
        preprocessing["calibration_sha256"] = calibration_checksums(
            params, tuple(sources[0]["frame_shape"]))
    stamps = {k: _file_stamp(options[k]) for k in ("mask", "poni")
              if k in options and os.path.exists(options[k])}
    parameters = {"shard_size": int(shard_size), "skip_bad": bool(skip_bad),
                  "drop_misses": bool(drop_misses), "hit_min_peaks": int(hit_min_peaks),
                  "hit_min_ring_photons": float(hit_min_ring_photons), "classes": classes,
                  "labels": labels_meta, "reader_options": options, "seed": 0}
    spec_params = dict(parameters, labels=labels_meta and labels_meta["sha256"])  # not its path
    spec = _sha({"version": SPEC_VERSION, "parameters": spec_params, "option_files": stamps,
                 "preprocessing": preprocessing,
                 "inputs": [(s["name"], s["bytes"], s["mtime_ns"], s["reader"], s["frames"])
                            for s in sources], "bad": bad})
    parameters["spec_sha256"] = spec
    # shards: contiguous runs of the global frame list
    n = len(frame_files)
    bounds = np.cumsum([0] + [s["frames"] for s in sources])
    segments = []
    for k in range(max(1, math.ceil(n / shard_size)) if n else 0):
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        seg = []
        i = int(np.searchsorted(bounds, lo, side="right")) - 1
        while i < len(sources) and bounds[i] < hi:
            a, b = max(lo, bounds[i]), min(hi, bounds[i + 1])
            if a < b:
                seg.append((i, int(a - bounds[i]), int(b - bounds[i]), int(a)))
            i += 1
        segments.append(seg)
    keys = [_sha([spec, k]) for k in range(len(segments))]
    staging = staging_dir(out_dir, spec)
    keep, todo = _resume(out_dir, staging, keys, force, spec, classes, ConfigError)
    for s in sources:
        s.pop("labels", None)
    return {"sources": sources, "bad": bad, "segments": segments, "labels": labels,
            "classes": classes, "spec": spec, "keys": keys, "todo": todo, "keep": keep,
            "staging": staging, "out_dir": out_abs, "parameters": parameters,
            "options": options,
            "geometry": None if tabular else geoms[0],
            "geometry_differs": [s["name"] for s, g in zip(sources, geoms) if g != geoms[0]],
            "preprocessing": preprocessing, "params": params, "tabular": tabular, "n_frames": n,
            "skip_bad": skip_bad, "drop_misses": drop_misses}


def _apply_calibration(params, calibrations):
    """Take ``adu_per_photon``/``pedestal`` from the files when ``params`` leaves the defaults.

    Files that record their calibration (``lcls-dl simulate`` writes
    ``detector_1/lcls_dl_adu_per_photon`` and ``lcls_dl_pedestal``) must all agree.
    """
    import dataclasses

    given = [(name, c) for name, c in calibrations if c]
    if not given or params.adu_per_photon != 1.0 or params.pedestal is not None:
        return params
    first_name, first = given[0]
    for name, c in given[1:]:
        if c != first:
            raise InputError(f"detector calibration {c} differs from {first_name}'s {first}; "
                             "ingest them separately or set --preprocess adu_per_photon=...",
                             name)
    if len(given) != len(calibrations):
        missing = next(name for name, c in calibrations if not c)
        raise InputError(f"file has no detector calibration but {first_name} has {first}", missing)
    return dataclasses.replace(params, **first)


def _shard_summary(path, key, classes):
    """Summary of an existing complete shard whose key attribute is ``key``, else None."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get(SHARD_KEY_ATTR) != key:
                return None
            frames = int(len(f["id"]))
            lab = f["label"][...]
    except (OSError, KeyError):
        return None
    counts = {c: int((lab == i).sum()) for i, c in enumerate(classes)}
    counts["unlabeled"] = int((lab < 0).sum())
    return {"name": os.path.basename(path), "frames": frames, "class_counts": counts,
            "bytes": os.path.getsize(path)}


def _resume(out_dir, staging, keys, force, spec, classes, ConfigError):
    """Which shards are kept (in DATASET_DIR or staging) and which must be computed.

    ``classes``: this ingest's class names (part of ``spec``), for the counts of shards
    found complete in staging."""
    old = None
    mpath = os.path.join(out_dir, "manifest.json")
    if os.path.isfile(mpath):
        try:
            with open(mpath, encoding="utf-8") as fh:
                old = json.load(fh)
        except (OSError, ValueError):
            old = None
        old_spec = (old or {}).get("parameters", {}).get("spec_sha256")
        if old_spec != spec and not force:
            raise ConfigError("DATASET_DIR holds a dataset built from other inputs or parameters; "
                              "use --force to rebuild it (or choose another --out)", out_dir)
    elif os.path.isdir(out_dir) and not force:
        strays = [f for f in os.listdir(out_dir)
                  if not (f.startswith("shard-") or f in ("labels.jsonl",) or f.startswith("."))]
        if strays:
            raise ConfigError(f"DATASET_DIR exists and holds other files ({strays[0]}, ...); "
                              "choose an empty or new directory, or use --force", out_dir)
    keep, todo = {}, []
    old_shards = {s["name"]: s for s in (old or {}).get("shards", [])} if old else {}
    for k, key in enumerate(keys):
        name = shard_name(k)
        if not force:
            done = os.path.join(out_dir, name)
            rec = old_shards.get(name)
            if rec is not None and os.path.isfile(done) and \
                    os.path.getsize(done) == rec.get("bytes"):
                summ = _shard_summary(done, key, (old or {}).get("classes", []))
                if summ is not None and summ["frames"] == rec.get("frames"):
                    summ["sha256"] = rec["sha256"]
                    summ["class_counts"] = rec.get("class_counts", summ["class_counts"])
                    summ["where"] = "final"
                    keep[k] = summ
                    continue
            staged = os.path.join(staging, name)
            if os.path.isfile(staged):
                summ = _shard_summary(staged, key, classes)
                if summ is not None:
                    summ["where"] = "staging"
                    keep[k] = summ
                    continue
        todo.append(k)
    return keep, todo


# -- working ----------------------------------------------------------------------------------
class ReadBuffer:
    """One array reused for every chunk of frames read (each valid until the next call).

    Fresh memory costs a page fault per 4 KiB on first touch: 2-10 ms per 4.6 MB CSPAD
    frame on this machine, more than reading the frame from the page cache (~1 ms).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> buf = ReadBuffer()
    >>> src = SimpleNamespace(frame_shape=(4, 6), dtype=np.uint16)
    >>> a = buf(src, 3)
    >>> a.shape, a.dtype, buf(src, 2).base is a.base
    ((3, 4, 6), dtype('uint16'), True)
    """

    def __init__(self):
        self._raw = None

    def __call__(self, src, n):
        """An uninitialized ``(n, *src.frame_shape)`` array of ``src.dtype``."""
        shape, dtype = (int(n),) + tuple(src.frame_shape), np.dtype(src.dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self._raw is None or self._raw.nbytes < size:
            self._raw = np.empty(max(size, 1), np.uint8)
        return self._raw[:size].view(dtype).reshape(shape)


class _SourceCache:
    """Keep the last few sources open (a shard usually reads one or two files)."""

    def __init__(self, sources, options, size=2):
        self.sources, self.options, self.size = sources, options, size
        self._open = {}
        self.buffer = ReadBuffer()

    def get(self, i):
        src = self._open.pop(i, None)
        if src is None:
            s = self.sources[i]
            src = open_source(s["path"], name=s["name"], **self.options)
            if src.n_frames != s["frames"]:
                src.close()
                raise InputError(f"file changed during ingest ({src.n_frames} frames, "
                                 f"had {s['frames']})", s["path"])
        self._open[i] = src
        while len(self._open) > self.size:
            old = next(iter(self._open))
            self._open.pop(old).close()
        return src

    def close(self):
        for src in self._open.values():
            src.close()
        self._open.clear()


def _test_kill_after_shard(rank):
    """Test hook: ``LCLS_DL_TEST_INGEST_KILL=R`` SIGKILLs rank R after its first staged shard
    (``LCLS_DL_TEST_KILL_ONCE=PREFIX``: only if ``PREFIX.ingest.R`` does not exist yet)."""
    spec = os.environ.get("LCLS_DL_TEST_INGEST_KILL")
    if spec is None or int(spec) != int(rank):
        return
    once = os.environ.get("LCLS_DL_TEST_KILL_ONCE")
    if once:
        mark = f"{once}.ingest.{rank}"
        if os.path.exists(mark):
            return
        with open(mark, "w") as fh:
            fh.write(str(os.getpid()))
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def build_shard(plan, k, cache, pres, chunk_size=DEFAULT_CHUNK_SIZE, on_frames=None):
    """Compute shard ``k`` of a plan and write it to the staging directory; return its summary."""
    skip_bad, drop = plan["skip_bad"], plan["drop_misses"]
    cols = {"image": [], "profile": [], "scalars": [], "label": [], "id": [], "file": [],
            "event": []}
    bad, scalar_names = [], None
    for i, lo, hi, g0 in plan["segments"][k]:
        meta = plan["sources"][i]
        src = cache.get(i)
        for a in range(lo, hi, chunk_size):
            b = min(hi, a + chunk_size)
            events = src.events[a:b]
            where_of = (lambda j, ev=events: f"{meta['path']}:{int(ev[j])}")
            if src.tabular:
                prof, scal = src.read_table(a, b)
                finite = np.isfinite(prof).all(axis=1) & np.isfinite(scal).all(axis=1)
                if not finite.all():
                    j = int(np.flatnonzero(~finite)[0])
                    if not skip_bad:
                        raise InputError("row contains NaN/inf values", where_of(j))
                    bad.extend({"where": where_of(int(j)), "what": "row contains NaN/inf values"}
                               for j in np.flatnonzero(~finite))
                kept = np.flatnonzero(finite)
                out = {"image": np.zeros((len(kept), 0, 0), np.float32),
                       "profile": prof[kept].astype(np.float32),
                       "scalars": scal[kept].astype(np.float32)}
                scalar_names = meta["scalar_names"]
            else:
                frames = src.read(a, b, out=cache.buffer(src, b - a))
                pre = pres.get(src.geometry)
                scalar_names = list(pre.scalar_names)
                out, kept = _process(pre, frames, where_of, skip_bad, bad)
                if out is not None and drop and len(kept):
                    hits = hit_flags(out["scalars"], scalar_names,
                                     plan["parameters"]["hit_min_peaks"],
                                     plan["parameters"]["hit_min_ring_photons"])
                    out = {key: v[hits] for key, v in out.items()}
                    kept = kept[hits]
            if on_frames is not None:
                on_frames(b - a)
            if out is None or not len(kept):
                continue
            for key in ("image", "profile", "scalars"):
                cols[key].append(np.asarray(out[key], np.float32))
            rows = g0 + (a - lo) + kept
            cols["label"].append(plan["labels"][rows])
            ev = events[kept]
            cols["event"].append(ev.astype(np.int64))
            cols["file"].extend([meta["name"]] * len(kept))
            cols["id"].extend(f"{meta['name']}:{int(e)}" for e in ev)
    shapes = plan.get("shapes") or {}
    arrays = {}
    for key in ("image", "profile", "scalars"):
        arrays[key] = (np.concatenate(cols[key]) if cols[key]
                       else np.zeros((0,) + tuple(shapes.get(key, ())), np.float32))
    label = np.concatenate(cols["label"]) if cols["label"] else np.zeros(0, np.int16)
    event = np.concatenate(cols["event"]) if cols["event"] else np.zeros(0, np.int64)
    names = scalar_names if scalar_names is not None else plan.get("scalar_names", [])
    path = os.path.join(plan["staging"], shard_name(k))
    summary = write_shard(path, arrays["image"], arrays["profile"], arrays["scalars"], names,
                          label, cols["id"], cols["file"], event,
                          attrs={SHARD_KEY_ATTR: plan["keys"][k], "spec_sha256": plan["spec"]})
    counts = {c: int((label == j).sum()) for j, c in enumerate(plan["classes"])}
    counts["unlabeled"] = int((label < 0).sum())
    summary.update(class_counts=counts, where="staging", bad=bad)
    return summary


def _shapes(plan, pres):
    """Per-frame output shapes and scalar names (for empty shards), from a 1-frame dry run."""
    if plan["tabular"]:
        s = plan["sources"][0]
        return ({"image": (0, 0), "profile": tuple(s["frame_shape"]),
                 "scalars": (len(s["scalar_names"]),)}, list(s["scalar_names"]))
    from .geometry import DetectorGeometry

    g = DetectorGeometry.from_dict(plan["geometry"])
    pre = pres.get(g)
    out = pre.batch(np.zeros((1,) + tuple(g.frame_shape), np.float32))
    return ({k: tuple(np.asarray(out[k]).shape[1:]) for k in ("image", "profile", "scalars")},
            list(pre.scalar_names))


def ingest(inputs, out_dir, labels_csv=None, shard_size=DEFAULT_SHARD_SIZE, np=1,
           skip_bad=False, drop_misses=False, force=False, params=None, classes=None,
           chunk_size=DEFAULT_CHUNK_SIZE, hit_min_peaks=HIT_MIN_PEAKS,
           hit_min_ring_photons=HIT_MIN_RING_PHOTONS, command=None, show_progress=False,
           **reader_options):
    """Ingest detector files into a dataset directory; return the manifest dict.

    Parameters
    ----------
    inputs : str or list of str
        Files, directories, globs.
    out_dir : str
        DATASET_DIR.
    labels_csv : str, optional
        ``file,event,label`` (or ``event,label`` for one input file) CSV.
    shard_size : int
        Frames per shard (the unit of work and of resume).
    np : int
        MPI ranks; > 1 starts ``mpiexec`` running ``lcls-dl ingest`` (unless this process
        already is a rank of an MPI job, in which case the job's ranks share the work).
    skip_bad : bool
        Skip unreadable files and bad frames, listing them in ``manifest["bad"]``.
    drop_misses : bool
        Keep only hits (:func:`hit_flags` with ``hit_min_peaks``, ``hit_min_ring_photons``).
    force : bool
        Rebuild every shard, also over a dataset built with other parameters.
    params : PreprocessParams or dict, optional
        Default: ``PreprocessParams()`` with the files' recorded calibration.
    classes : list of str, optional
        Class list (label names outside it are an error); default from the labels.
    chunk_size : int
        Frames read and preprocessed at a time.
    command : str, optional
        The command line, recorded in the manifest.
    show_progress : bool
        A tqdm bar on rank 0 (honors ``-q``).
    **reader_options
        See :mod:`lcls_dl.ingest.readers`.

    Returns
    -------
    dict
        The manifest; when the dataset was already complete with the same inputs and
        parameters nothing is written and the returned dict has ``"_up_to_date": True``.

    Examples
    --------
    >>> m = ingest(["run1"], "data1", labels_csv="run1/truth.csv")   # doctest: +SKIP
    >>> m["n_frames"], m["classes"]                                  # doctest: +SKIP
    (200, ['water', 'ice', 'miss'])
    """
    from ..distributed.launcher import comm_world, in_mpi_job, maybe_launch

    settings = dict(labels_csv=labels_csv, shard_size=shard_size, skip_bad=skip_bad,
                    drop_misses=drop_misses, force=force, params=params, classes=classes,
                    chunk_size=chunk_size, hit_min_peaks=hit_min_peaks,
                    hit_min_ring_photons=hit_min_ring_photons)
    if np is not None and int(np) > 1 and not in_mpi_job():
        argv = cli_argv(inputs, out_dir, quiet=not show_progress, **settings, **reader_options)
        code = maybe_launch(argv, int(np))
        if code:
            raise LclsError(f"MPI ingest failed with exit code {code} (see its output above)",
                            out_dir)
        with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as fh:
            return json.load(fh)
    return _run(inputs, out_dir, settings, command, show_progress, comm_world(), reader_options)


def cli_argv(inputs, out_dir, labels_csv=None, shard_size=DEFAULT_SHARD_SIZE, skip_bad=False,
             drop_misses=False, force=False, params=None, classes=None,
             chunk_size=DEFAULT_CHUNK_SIZE, hit_min_peaks=HIT_MIN_PEAKS,
             hit_min_ring_photons=HIT_MIN_RING_PHOTONS, quiet=True, **reader_options):
    """The ``lcls-dl`` arguments that run the same ingest (used to start MPI ranks)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    argv = (["-q"] if quiet else []) + ["ingest"] + [os.fspath(i) for i in inputs]
    argv += ["--out", os.fspath(out_dir), "--shard-size", str(shard_size),
             "--chunk-size", str(chunk_size), "--hit-min-peaks", str(hit_min_peaks),
             "--hit-min-ring-photons", repr(float(hit_min_ring_photons))]
    if labels_csv:
        argv += ["--labels", os.fspath(labels_csv)]
    for flag, on in (("--skip-bad", skip_bad), ("--drop-misses", drop_misses),
                     ("--force", force)):
        if on:
            argv.append(flag)
    if classes:
        argv += ["--classes", ",".join(classes)]
    if params is not None:
        p = _params_obj(params).to_dict()
        default = _params_obj(None).to_dict()
        for key, value in p.items():
            if value != default.get(key):
                argv += ["--preprocess", f"{key}={json.dumps(value)}"]
    for key, value in _clean_options(reader_options).items():
        flag = "--" + key.replace("_", "-")
        if key == "beam_center":
            argv += [flag, ",".join(str(v) for v in value)]
        elif key == "classes":
            continue
        else:
            argv += [flag, str(value)]
    return argv


def _run(inputs, out_dir, settings, command, show_progress, comm, reader_options):
    rank = comm.Get_rank() if comm is not None else 0
    size = comm.Get_size() if comm is not None else 1
    import time

    t_start = time.perf_counter()
    settings = dict(settings)
    chunk_size = settings.pop("chunk_size", DEFAULT_CHUNK_SIZE)
    plan, error = None, None
    if rank == 0:
        try:
            plan = plan_ingest(inputs, out_dir, **settings, **reader_options)
        except Exception as exc:  # any failure: the other ranks must not wait in the barrier
            error = exc
    if comm is not None:
        idle_barrier(comm)
        plan, error_msg = comm.bcast((plan, None if error is None else str(error)), root=0)
        if rank != 0 and error_msg is not None:
            raise PeerError(error_msg)
    if error is not None:
        raise error
    pres = _Preprocessors(plan["params"], plan["preprocessing"].get("calibration_sha256"))
    if plan["todo"] or not plan["n_frames"]:
        # every rank builds its preprocessor (q map, bin tables) at the same time, after
        # the plan: rank 0 alone before the broadcast would keep the others waiting
        plan["shapes"], plan["scalar_names"] = _shapes(plan, pres)
    log.debug("rank %d: plan ready after %.2f s (%d shards to do)", rank,
              time.perf_counter() - t_start, len(plan["todo"]))
    up_to_date = (not plan["todo"] and all(v["where"] == "final" for v in plan["keep"].values())
                  and os.path.isfile(os.path.join(out_dir, "manifest.json")))
    if up_to_date:
        with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as fh:
            manifest = json.load(fh)
        manifest["_up_to_date"] = True
        return manifest
    mine = plan["todo"][rank::size]
    rounds = math.ceil(len(plan["todo"]) / size)
    bar = None
    if rank == 0 and show_progress:
        from ..cli.common import progress

        total = sum(sum(b - a for _, a, b, _ in plan["segments"][k]) for k in plan["todo"])
        bar = progress(total=total, desc="ingest", unit="frame")
    cache = _SourceCache(plan["sources"], plan["options"])
    summaries, first_error = {}, None
    try:
        os.makedirs(plan["staging"], exist_ok=True)
        for r in range(rounds):
            done = [0]

            def count(n):
                done[0] += n
                if bar is not None:
                    bar.update(n)

            failed = 0
            if r < len(mine) and first_error is None:
                k = mine[r]
                try:
                    t0 = time.perf_counter()
                    summaries[k] = build_shard(plan, k, cache, pres, chunk_size, count)
                    log.debug("rank %d: shard %d (%d frames) in %.2f s", rank, k,
                              summaries[k]["frames"], time.perf_counter() - t0)
                    _test_kill_after_shard(rank)
                except LclsError as exc:
                    first_error, failed = exc, 1
                except Exception as exc:  # a bug on one rank must not hang the others
                    first_error, failed = LclsError(f"{type(exc).__name__}: {exc}",
                                                    f"rank {rank}"), 1
            if comm is not None:
                from mpi4py import MPI

                idle_barrier(comm)
                failed, frames = comm.allreduce(np.array([failed, done[0]], np.int64), op=MPI.SUM)
                if bar is not None:
                    bar.update(int(frames) - done[0])
            if failed:
                break
    finally:
        cache.close()
        if bar is not None:
            bar.close()
    # agree on errors, gather summaries
    if comm is not None:
        idle_barrier(comm)
        gathered = comm.gather((summaries, None if first_error is None else
                                (str(first_error), type(first_error).__name__)), root=0)
        if rank == 0:
            errors = [e for _, e in gathered if e is not None]
            for s, _ in gathered:
                summaries.update(s)
        else:
            errors = []
        errors = comm.bcast(errors, root=0)
    else:
        errors = [] if first_error is None else [(str(first_error), "")]
    if errors:
        if rank == 0:
            shutil.rmtree(plan["staging"], ignore_errors=True)
            if first_error is not None:
                raise first_error
            raise LclsError(errors[0][0])
        raise PeerError(errors[0][0])
    manifest, finish_error = None, None
    log.debug("rank %d: shards done after %.2f s", rank, time.perf_counter() - t_start)
    if rank == 0:
        try:
            manifest = _finish(plan, summaries, command)
        except Exception as exc:  # reported by rank 0 below; the others must not hang
            finish_error = exc
    if comm is not None:
        idle_barrier(comm)
        manifest, error_msg = comm.bcast(
            (manifest, None if finish_error is None else str(finish_error)), root=0)
        if rank != 0 and error_msg is not None:
            raise PeerError(error_msg)
    if finish_error is not None:
        raise finish_error
    return manifest


def _finish(plan, summaries, command):
    """Rank 0: move staged shards into DATASET_DIR and write the manifest last."""
    out_dir, staging = plan["out_dir"], plan["staging"]
    shards, bad = [], list(plan["bad"])
    for k in range(len(plan["segments"])):
        s = summaries.get(k) or plan["keep"][k]
        if s.get("where") == "staging" and "sha256" not in s:
            s["sha256"] = file_sha256(os.path.join(staging, s["name"]))
        bad.extend(s.get("bad", []))
        shards.append(s)
    os.makedirs(out_dir, exist_ok=True)
    mpath = os.path.join(out_dir, "manifest.json")
    if os.path.exists(mpath):
        os.unlink(mpath)  # the old dataset ends here; the new one begins with its manifest
    for s in shards:
        if s["where"] == "staging":
            os.replace(os.path.join(staging, s["name"]), os.path.join(out_dir, s["name"]))
    names = {s["name"] for s in shards}
    for f in os.listdir(out_dir):
        if f.startswith("shard-") and f.endswith(".h5") and f not in names:
            os.unlink(os.path.join(out_dir, f))
    inputs = [{"path": s["name"], "bytes": s["bytes"], "frames": s["frames"],
               "reader": s["reader"]} for s in plan["sources"]]
    pre = dict(plan["preprocessing"])
    if not plan["tabular"]:
        pre["scalar_names"] = plan.get("scalar_names") or []
        # (H, W) of the polar image; its channel count is ``image_channels``
        pre["image_shape"] = list((plan.get("shapes") or {}).get("image", ()))[:2]
    params = dict(plan["parameters"])
    if plan["geometry_differs"]:
        params["geometry_differs"] = plan["geometry_differs"]
    manifest = build_manifest(params, inputs, plan["geometry"], pre, plan["classes"], shards,
                              bad, command=command)
    write_json(mpath, manifest)
    shutil.rmtree(staging, ignore_errors=True)
    prefix = os.path.basename(staging_dir(out_dir, ""))  # stale staging of older killed runs
    parent = os.path.dirname(staging)
    for d in os.listdir(parent):
        if d.startswith(prefix):
            shutil.rmtree(os.path.join(parent, d), ignore_errors=True)
    return manifest


# -- prediction from raw files ----------------------------------------------------------------
def iter_preprocessed(paths, preprocessing_dict, batch_size=DEFAULT_CHUNK_SIZE, skip_bad=False,
                      **reader_options):
    """Preprocess raw files exactly as a dataset (or model) records, batch by batch.

    Parameters
    ----------
    paths : str or list of str
        Files, directories, globs (expanded and sorted as ingest does).
    preprocessing_dict : dict
        ``manifest["preprocessing"]`` or ``model.json``'s copy of it.
    batch_size : int
    skip_bad : bool
        Skip unreadable files and bad frames (logged as warnings) instead of raising.
    **reader_options
        As for :func:`ingest`.

    Yields
    ------
    dict
        ``image (k, H, W[, C])``, ``profile (k, Q)``, ``scalars (k, S)`` float32, ``ids``,
        ``files`` (lists of str), ``events`` (int64).

    Examples
    --------
    >>> for batch in iter_preprocessed("run2", model_meta["preprocessing"]):  # doctest: +SKIP
    ...     probs = model.predict(batch)
    """
    options = _clean_options(reader_options)
    tabular = bool(preprocessing_dict.get("tabular"))
    want_names = preprocessing_dict.get("scalar_names")
    params = None if tabular else _params_obj(preprocessing_dict)
    pres = None if tabular else _Preprocessors(params,
                                               preprocessing_dict.get("calibration_sha256"))
    buffer = ReadBuffer()
    for path, name in expand_inputs(paths):
        try:
            src = open_source(path, name=name, **options)
        except InputError as exc:
            if not skip_bad:
                raise
            log.warning("skipping %s: %s", exc.where or path, exc.what)
            continue
        try:
            if src.tabular != tabular:
                raise InputError("input kind (table vs images) differs from the model's data",
                                 path)
            if not tabular and src.geometry is None:
                raise InputError("no detector geometry: give --pixel-size-um, --distance-mm "
                                 "and --energy-ev (or --poni)", path)
            for a in range(0, src.n_frames, batch_size):
                b = min(src.n_frames, a + batch_size)
                events = src.events[a:b]
                where_of = (lambda j, ev=events: f"{path}:{int(ev[j])}")
                if tabular:
                    prof, scal = src.read_table(a, b)
                    if want_names is not None and list(src.scalar_names) != list(want_names):
                        raise InputError("table columns differ from the model's features", path)
                    out = {"image": np.zeros((b - a, 0, 0), np.float32), "profile": prof,
                           "scalars": scal}
                    kept = np.arange(b - a)
                else:
                    pre = pres.get(src.geometry)
                    if want_names is not None and list(pre.scalar_names) != list(want_names):
                        raise InputError("this lcls-dl computes other scalar features than the "
                                         "model was trained on", path)
                    bad = []
                    frames = src.read(a, b, out=buffer(src, b - a))
                    out, kept = _process(pre, frames, where_of, skip_bad, bad)
                    for item in bad:
                        log.warning("skipping %s: %s", item["where"], item["what"])
                    if out is None:
                        continue
                ev = events[kept].astype(np.int64)
                yield {"image": np.asarray(out["image"], np.float32),
                       "profile": np.asarray(out["profile"], np.float32),
                       "scalars": np.asarray(out["scalars"], np.float32),
                       "ids": [f"{src.name}:{int(e)}" for e in ev],
                       "files": [src.name] * len(ev), "events": ev}
        finally:
            src.close()
