"""Join a labels CSV onto the frames of an ingest.

The CSV has a header and either ``file,event,label`` or, for a single input file,
``event,label`` columns (other columns, e.g. the simulator's truth parameters, are ignored).
``file`` is matched against the frame's file name relative to its input root, then its
base name (when that is unambiguous). An empty label means "unlabeled". A row naming a
frame that is not in the inputs, or a label name outside the class list, is an
:class:`~lcls_dl.errors.InputError` naming ``file:event``.

Class list: ``classes`` when given (``--classes water,ice,miss``), else the canonical order
``water, ice, miss`` (those present) followed by any other names, sorted.

Examples
--------
>>> rows = [("run1.cxi", 0, "ice"), ("run1.cxi", 2, "water")]
>>> names = join_labels(rows, ["run1.cxi"] * 3, [0, 1, 2])
>>> names
['ice', None, 'water']
>>> classes = class_list(names)
>>> classes, label_indices(names, classes).tolist()
(['water', 'ice'], [1, -1, 0])
"""
import csv
import os
import re

import numpy as np

from ..errors import InputError

DEFAULT_CLASSES = ("water", "ice", "miss")
NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def read_labels_csv(path):
    """Read a labels CSV -> list of ``(file or None, event, label or None)``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError("labels file not found", path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's BOM
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            reader.fieldnames = fields
            if "event" not in fields or "label" not in fields:
                raise InputError("labels CSV needs columns event,label (and file for several "
                                 f"input files); found {','.join(fields) or 'none'}", path)
            rows = []
            for line, rec in enumerate(reader, start=2):
                ev = (rec.get("event") or "").strip()
                try:
                    event = int(ev)
                except ValueError:
                    raise InputError(f"event {ev!r} is not an integer", f"{path}:{line}") \
                        from None
                label = (rec.get("label") or "").strip() or None
                if label is not None and not NAME.match(label):
                    raise InputError(f"label name {label!r} must be letters, digits, _.+-",
                                     f"{path}:{line}")
                file = (rec.get("file") or "").strip() or None if "file" in fields else None
                rows.append((file, event, label))
    except UnicodeDecodeError as exc:
        raise InputError(f"labels file is not UTF-8 text: {exc.reason}", path) from None
    return rows


def join_labels(rows, files, events, where="labels"):
    """Label name (or None) for every frame ``(files[i], events[i])``.

    Parameters
    ----------
    rows : list of (file or None, event, label or None)
        From :func:`read_labels_csv`.
    files, events : sequences
        The frames' file names (relative to their input root) and event numbers.
    where : str
        The labels file, for messages.

    Raises
    ------
    InputError
        A row for a frame not in the inputs (names ``file:event``), rows without ``file``
        when there are several input files, two different labels for one frame.
    """
    files = [str(f) for f in files]
    index = {(f, int(e)): i for i, (f, e) in enumerate(zip(files, events))}
    names = sorted(set(files))
    by_base = {}
    for f in names:
        by_base.setdefault(os.path.basename(f), []).append(f)
    out = [None] * len(files)
    for file, event, label in rows:
        if file is None:
            if len(names) != 1:
                raise InputError(f"labels have no file column but there are {len(names)} input "
                                 "files; use file,event,label", where)
            key = (names[0], event)
        elif (file, event) in index or file in names:
            key = (file, event)
        else:
            cands = by_base.get(os.path.basename(file), [])
            if len(cands) != 1:
                raise InputError("label for unknown frame (file not among the inputs)",
                                 f"{where}: {file}:{event}")
            key = (cands[0], event)
        i = index.get(key)
        if i is None:
            raise InputError("label for unknown event (not in the input file)",
                             f"{where}: {key[0]}:{event}")
        if out[i] is not None and label is not None and out[i] != label:
            raise InputError(f"two labels ({out[i]}, {label}) for one frame",
                             f"{where}: {key[0]}:{event}")
        out[i] = label if label is not None else out[i]
    return out


def class_list(names, classes=None, where="labels"):
    """The class list for label ``names`` (None entries ignored).

    With ``classes`` given, every name must be in it (else InputError naming the first unknown
    label); otherwise water, ice, miss (those present) come first, then the others sorted.
    """
    present = {n for n in names if n is not None}
    if classes:
        classes = [c.strip() for c in classes if c.strip()]
        if len(set(classes)) != len(classes):
            raise InputError(f"duplicate class name in {','.join(classes)}", "--classes")
        unknown = sorted(present - set(classes))
        if unknown:
            raise InputError(f"unknown label name {unknown[0]!r} (classes: {','.join(classes)})",
                             where)
        return list(classes)
    return [c for c in DEFAULT_CLASSES if c in present] + sorted(present - set(DEFAULT_CLASSES))


def label_indices(names, classes):
    """int16 class indices of label ``names`` (-1 for None)."""
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([-1 if n is None else lookup[n] for n in names], np.int16)
