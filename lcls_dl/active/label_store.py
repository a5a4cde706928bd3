"""The label store of a dataset: an append-only log that never loses a label.

``DATASET/labels.jsonl`` holds one JSON object per line, one line per change::

    {"id": "run0001.cxi:17", "label": "ice", "who": "jdoe", "when": "2026-11-25T16:06:49Z",
     "source": "human"}

``label`` may be ``null`` (label removed). The current label of a sample is its last
line. ``source`` is one of ``human``, ``oracle`` (simulated labeler), ``pseudo``
(model's confident guess; never counted as a human label), ``ingest``, ``import``.
Appends take an exclusive ``flock`` and are fsynced; a crash mid-append leaves at most
one partial last line, which readers ignore and the next writer repairs (truncates the
file back to its last newline before appending).

Examples
--------
>>> store = LabelStore("data1")                                # doctest: +SKIP
>>> store.set(["run1.cxi:3", "run1.cxi:9"], ["ice", "water"])  # doctest: +SKIP
2
>>> store.current()["run1.cxi:3"]["label"]                     # doctest: +SKIP
'ice'
>>> store.export_csv("labels.csv")                             # doctest: +SKIP
2
"""
import csv
import fcntl
import getpass
import io
import json
import os

from ..errors import InputError

LOG_NAME = "labels.jsonl"
SOURCES = ("human", "oracle", "pseudo", "ingest", "import")


def default_who():
    """The user name recorded with a change (``$LCLS_DL_USER``, else the login name)."""
    who = os.environ.get("LCLS_DL_USER")
    if who:
        return who
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers): still record something
        return f"uid{os.getuid()}"


class LabelStore:
    """Labels of one dataset directory (see module docstring for the format).

    Parameters
    ----------
    dataset_dir : str or path
        The dataset directory; ``labels.jsonl`` lives there.
    """

    def __init__(self, dataset_dir):
        self.dataset_dir = os.fspath(dataset_dir)
        self.path = os.path.join(self.dataset_dir, LOG_NAME)

    # -- reading ------------------------------------------------------------------------------
    def history(self, ids=None):
        """All complete records, oldest first (a partial last line is skipped).

        Parameters
        ----------
        ids : iterable of str, optional
            Only records of these sample ids.
        """
        if not os.path.exists(self.path):
            return []
        wanted = None if ids is None else set(ids)
        records = []
        with open(self.path, "rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # torn final write: ignored
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "id" in rec:
                    if wanted is None or rec["id"] in wanted:
                        records.append(rec)
        return records

    def current(self, sources=None, exclude_sources=()):
        """``{id: last record}`` per sample, over records of ``sources`` (default all)."""
        out = {}
        for rec in self.history():
            src = rec.get("source")
            if (sources is None or src in sources) and src not in exclude_sources:
                out[rec["id"]] = rec
        return out

    def labels(self, sources=None, exclude_sources=("pseudo",)):
        """``{id: label name}`` of the currently labeled samples (removed labels dropped)."""
        return {i: r["label"] for i, r in self.current(sources, exclude_sources).items()
                if r.get("label") is not None}

    # -- writing ------------------------------------------------------------------------------
    def set(self, ids, labels, who=None, source="human", when=None, dataset=None,
            allow_new_class=False):
        """Append one change per sample under an exclusive lock; return the number written.

        Parameters
        ----------
        ids : sequence of str
            Sample ids ``<file>:<event>``.
        labels : sequence of str or None, or one str
            Class names (``None`` removes a label). One string applies to every id.
        who : str, optional
            Who made the change (default: the user name, see :func:`default_who`).
        source : str
            One of :data:`SOURCES`.
        when : str, optional
            ISO-8601 UTC time (default: now).
        dataset : lcls_dl.dataset.Dataset, optional
            Validate against it (default: open the store's dataset directory when it has a
            manifest; with no manifest, no validation).
        allow_new_class : bool
            Accept label names not in the dataset's classes (always accepted while the
            dataset has no classes at all, e.g. after an ingest without labels).

        Raises
        ------
        InputError
            Unknown ids or label names (naming them), a bad source, or mismatched lengths.
        """
        from ..provenance import utc_now

        ids = [str(i) for i in ids]
        if isinstance(labels, str) or labels is None:
            labels = [labels] * len(ids)
        labels = [None if lab is None else str(lab) for lab in labels]
        if len(labels) != len(ids):
            raise InputError(f"{len(ids)} ids but {len(labels)} labels", self.path)
        if source not in SOURCES:
            raise InputError(f"unknown label source {source!r} (one of {', '.join(SOURCES)})",
                             self.path)
        self._validate(ids, labels, dataset, allow_new_class)
        who = default_who() if who is None else str(who)
        when = utc_now() if when is None else str(when)
        payload = "".join(json.dumps({"id": i, "label": lab, "who": who, "when": when,
                                      "source": source}, ensure_ascii=False) + "\n"
                          for i, lab in zip(ids, labels)).encode("utf-8")
        if not payload:
            return 0
        self._append(payload)
        return len(ids)

    def _append(self, payload):
        os.makedirs(self.dataset_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                _repair_torn_tail(fd)
                end = os.lseek(fd, 0, os.SEEK_END)
                view = memoryview(payload)
                written = 0
                while written < len(view):
                    written += os.pwrite(fd, view[written:], end + written)
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _validate(self, ids, labels, dataset, allow_new_class):
        if dataset is None:
            from ..dataset import MANIFEST, Dataset

            if not os.path.isfile(os.path.join(self.dataset_dir, MANIFEST)):
                return
            dataset = Dataset(self.dataset_dir)
        pos = dataset.index_of(ids)
        unknown = [i for i, p in zip(ids, pos) if p < 0]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more"
                                              if len(unknown) > 5 else "")
            raise InputError(f"{len(unknown)} unknown sample id(s): {shown}", self.dataset_dir)
        if not allow_new_class and dataset.classes:  # an unlabeled ingest has no classes yet
            known = set(dataset.classes)
            new = sorted({lab for lab in labels if lab is not None and lab not in known})
            if new:
                raise InputError(f"unknown class name(s) {', '.join(map(repr, new))}; classes "
                                 f"are {', '.join(dataset.classes)} (use --allow-new-class "
                                 "to add a class)", self.dataset_dir)

    # -- CSV ----------------------------------------------------------------------------------
    def import_csv(self, path, who=None, source="import", dataset=None,
                   allow_new_class=False):
        """Append the labels of a CSV file; return the number of labels written.

        The file has a header with either ``id,label`` or ``file,event,label`` columns
        (``id`` is ``<file>:<event>``). Empty labels remove a label. The whole file is
        checked before anything is written.
        """
        ids, labels = read_label_csv(path)
        try:
            return self.set(ids, labels, who=who, source=source, dataset=dataset,
                            allow_new_class=allow_new_class)
        except InputError as exc:
            raise InputError(exc.what, f"{path}; {exc.where}") from None

    def export_csv(self, path, sources=None, exclude_sources=("pseudo",), with_history=False):
        """Write current labels as CSV ``id,file,event,label,who,when,source`` atomically.

        With ``with_history`` every change is written instead of the current state.
        Returns the number of rows written.
        """
        from ..atomic import atomic_open

        if with_history:
            rows = [r for r in self.history()
                    if (sources is None or r.get("source") in sources)
                    and r.get("source") not in exclude_sources]
        else:
            rows = [r for r in self.current(sources, exclude_sources).values()
                    if r.get("label") is not None]
        with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "file", "event", "label", "who", "when", "source"])
            for r in rows:
                file, _, event = r["id"].rpartition(":")
                writer.writerow([r["id"], file, event, "" if r.get("label") is None
                                 else r["label"], r.get("who", ""), r.get("when", ""),
                                 r.get("source", "")])
        return len(rows)


def _repair_torn_tail(fd):
    """Truncate an unterminated last line (a crashed writer's) back to the last newline."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return
    if os.pread(fd, 1, size - 1) == b"\n":
        return
    pos = size
    block = 4096
    while pos > 0:
        start = max(0, pos - block)
        chunk = os.pread(fd, pos - start, start)
        k = chunk.rfind(b"\n")
        if k >= 0:
            os.ftruncate(fd, start + k + 1)
            return
        pos = start
    os.ftruncate(fd, 0)


def read_label_csv(path):
    """Read ``id,label`` or ``file,event,label`` CSV -> (ids, labels); empty label -> None.

    Raises
    ------
    InputError
        Missing file, missing columns, or a malformed row (naming the line).
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except OSError as exc:
        raise InputError(f"cannot read label file: {exc.strerror}", path) from None
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]
    reader.fieldnames = cols
    if "label" not in cols or not ("id" in cols or {"file", "event"} <= set(cols)):
        raise InputError("label CSV needs a header with id,label or file,event,label "
                         f"(found {','.join(cols) or 'nothing'})", path)
    ids, labels = [], []
    for line, row in enumerate(reader, start=2):
        if "id" in cols and (row.get("id") or "").strip():
            sid = row["id"].strip()
        else:
            file, event = (row.get("file") or "").strip(), (row.get("event") or "").strip()
            try:
                event = int(event)
            except ValueError:
                raise InputError(f"event {event!r} is not an integer", f"{path}:{line}") from None
            if not file:
                raise InputError("empty file name", f"{path}:{line}")
            sid = f"{file}:{event}"
        label = (row.get("label") or "").strip()
        ids.append(sid)
        labels.append(label or None)
    return ids, labels
