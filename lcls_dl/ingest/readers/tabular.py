"""Tabular inputs: per-frame features or radial profiles in CSV or NetCDF (rows = frames).

These skip image preprocessing: the frames were already reduced by another system. A dataset
ingested from tables has the profile and scalars of each row and a **zero-size image**
(shape ``(N, 0, 0)`` in the shards, ``preprocessing["tabular"] = true`` in the manifest), so
``Dataset.read`` works unchanged and a trainer uses the DNN (profile + scalars) branch only.

CSV (comma or tab separated, one header line)
    ``event``   event number (default: the row index),
    ``label``   class name (empty = unlabeled), optional,
    profile columns: ``q_<value>`` (q in 1/angstrom, e.g. ``q_1.85``) or ``I_<n>`` /
    ``profile_<n>``, in column order,
    every other numeric column is a scalar feature (name kept); text columns (``file``,
    timestamps) are ignored.
NetCDF (netCDF4; NETCDF3 or NETCDF4)
    the frame dimension is the unlimited one, else ``frame``/``event``/``time``, else the
    first dimension of the profile variable; a 2-D variable ``(frame, q)`` (``profile``,
    ``I``, ``intensity``, or the only one) is the profile, its second dimension's coordinate
    variable the q values; 1-D numeric variables over frames are scalars; ``label`` (names
    or indices into ``classes``) and ``event`` as in CSV.

A table is small next to detector images, so it is read whole at open.
"""
import csv
import os
import re

import numpy as np

from ...errors import InputError
from . import FrameSource, labels_from_array

PROFILE_COLUMN = re.compile(r"^(q_(?P<q>[-+0-9.eE]+)|I_\d+|profile_\d+)$")


class TabularSource(FrameSource):
    """Rows of a CSV or NetCDF table as frames with a profile and scalars."""

    reader = "tabular"
    tabular = True

    def __init__(self, path, name=None, classes=None, **options):
        super().__init__(path, name)
        if not os.path.exists(self.path):
            raise InputError("no such file", self.path)
        lower = self.path.lower()
        if lower.endswith((".csv", ".tsv")):
            self._read_csv()
        else:
            self._read_netcdf(classes)
        self.n_frames = len(self.profile)
        self.frame_shape = (self.profile.shape[1],)
        self.dtype = np.dtype(np.float32)
        if self.events is None or len(self.events) == 0:
            self.events = np.arange(self.n_frames, dtype=np.int64)
        if len(np.unique(self.events)) != len(self.events):
            raise InputError("duplicate event numbers in table", self.path)

    def _read_csv(self):
        try:
            with open(self.path, newline="", encoding="utf-8") as fh:
                sample = fh.read(4096)
                fh.seek(0)
                delim = "\t" if ("\t" in sample.splitlines()[0] if sample else False) else ","
                rows = list(csv.reader(fh, delimiter=delim))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read CSV: {exc}", self.path) from None
        if not rows or not rows[0]:
            raise InputError("empty CSV table", self.path)
        header = [h.strip() for h in rows[0]]
        body = [r for r in rows[1:] if any(c.strip() for c in r)]
        for i, r in enumerate(body):
            if len(r) != len(header):
                raise InputError(f"row has {len(r)} columns, header has {len(header)}",
                                 f"{self.path}:{i + 2}")
        cols = {h: [r[j].strip() for r in body] for j, h in enumerate(header)}
        prof_cols = [h for h in header if PROFILE_COLUMN.match(h)]
        self.labels = None
        if "label" in cols:
            self.labels = [v or None for v in cols["label"]]
        self.events = None
        if "event" in cols:
            try:
                self.events = np.array([int(v) for v in cols["event"]], np.int64)
            except ValueError:
                raise InputError("non-integer value in column event", self.path) from None
        scal = []
        for h in header:
            if h in prof_cols or h in ("label", "event"):
                continue
            try:
                scal.append((h, np.array([float(v) for v in cols[h]], np.float32)))
            except ValueError:
                continue  # text column (file name, timestamp): not a feature
        self.profile = self._numbers(cols, prof_cols).reshape(len(body), len(prof_cols))
        qs = [PROFILE_COLUMN.match(h).group("q") for h in prof_cols]
        self.profile_q = (np.array([float(q) for q in qs]) if prof_cols and all(qs) else None)
        self.scalar_names = [h for h, _ in scal]
        self.scalars = (np.stack([v for _, v in scal], 1) if scal
                        else np.zeros((len(body), 0), np.float32))
        if not prof_cols and not scal:
            raise InputError("no numeric feature or profile columns in CSV", self.path)

    def _numbers(self, cols, names):
        out = np.zeros((len(next(iter(cols.values()))) if cols else 0, len(names)), np.float32)
        for j, h in enumerate(names):
            try:
                out[:, j] = [float(v) for v in cols[h]]
            except ValueError:
                raise InputError(f"non-numeric value in profile column {h}", self.path) from None
        return out

    def _read_netcdf(self, classes):
        try:
            import netCDF4
        except ImportError:
            raise InputError("reading NetCDF needs the netCDF4 package "
                             "(pip install 'lcls-dl[netcdf]')", self.path) from None
        try:
            ds = netCDF4.Dataset(self.path, "r")
        except OSError as exc:
            raise InputError(f"cannot open NetCDF file: {exc}", self.path) from None
        try:
            ds.set_auto_mask(False)
            v2 = {k: v for k, v in ds.variables.items() if v.ndim == 2 and v.dtype.kind in "uif"}
            pick = [k for k in ("profile", "I", "intensity") if k in v2] or sorted(v2)
            if len(pick) > 1 and pick[0] not in ("profile", "I", "intensity"):
                raise InputError(f"several 2-D variables ({', '.join(pick)}); name the profile "
                                 "'profile'", self.path)
            unlimited = [d for d, dim in ds.dimensions.items() if dim.isunlimited()]
            named = [d for d in ("frame", "event", "time") if d in ds.dimensions]
            if unlimited:
                fdim = unlimited[0]
            elif named:
                fdim = named[0]
            elif pick:
                fdim = v2[pick[0]].dimensions[0]
            else:
                raise InputError("no frame dimension in NetCDF file", self.path)
            n = len(ds.dimensions[fdim])
            if pick:
                var = v2[pick[0]]
                if var.dimensions[0] != fdim:
                    raise InputError(f"profile variable {pick[0]} is not (frame, q)", self.path)
                self.profile = np.asarray(var[...], np.float32)
                qdim = var.dimensions[1]
                self.profile_q = (np.asarray(ds.variables[qdim][...], float)
                                  if qdim in ds.variables else None)
            else:
                self.profile, self.profile_q = np.zeros((n, 0), np.float32), None
            self.events, self.labels, scal = None, None, []
            for k, v in ds.variables.items():
                if v.ndim != 1 or v.dimensions[0] != fdim:
                    continue
                if k == "event":
                    self.events = np.asarray(v[...], np.int64)
                elif k == "label":
                    self.labels = labels_from_array(np.asarray(v[...]), classes,
                                                    f"{self.path}:label")
                elif v.dtype.kind in "uif" and k != fdim:
                    scal.append((k, np.asarray(v[...], np.float32)))
            self.scalar_names = [k for k, _ in scal]
            self.scalars = (np.stack([v for _, v in scal], 1) if scal
                            else np.zeros((n, 0), np.float32))
            if not self.profile.shape[1] and not scal:
                raise InputError("no profile or feature variables in NetCDF file", self.path)
        finally:
            ds.close()

    def read(self, start, stop, out=None):
        """Profiles of rows ``start:stop`` ``(k, Q)`` (``out`` is not used)."""
        return self.profile[start:stop]

    def read_table(self, start, stop):
        """``(profile (k, Q), scalars (k, S))`` of rows ``start:stop`` as float32."""
        return self.profile[start:stop], self.scalars[start:stop]
