"""Which frames each rank trains on in an epoch.

:func:`partition` deals the labeled rows of a dataset to ``size`` ranks so that

- the parts are disjoint and together hold every row once (before padding);
- each class is spread evenly: a rank gets ``floor`` or ``ceil`` of
  ``n_class / size`` frames of every class, so a rare class (ice) is not left to one
  rank;
- the deal is reshuffled every epoch from a seed common to all ranks (every rank
  computes the same deal locally; nothing is communicated);
- every rank gets the same number of rows (``ceil(n / size)``): where the rows do not
  split evenly, the short ranks repeat their own first rows after shuffling (at most
  one duplicate per rank per epoch). The duplicates are plain duplication (no mask):
  at most ``size - 1`` extra samples per epoch, a weight change of ``<= 1 / per_rank``
  for those frames. So every rank runs the same number of steps and no rank waits in
  an allreduce another rank never enters. Pass ``pad=False`` for evaluation, where
  each frame must count once (and counts are reduced with ``allreduce_sum``).
"""
import numpy as np

from ..errors import InputError


def partition(rows, labels, epoch, seed, rank, size, pad=True):
    """Return the rows rank ``rank`` of ``size`` trains on in ``epoch``.

    Parameters
    ----------
    rows : array_like of int
        Dataset row indices of the labeled frames (same on all ranks, any order).
    labels : array_like of int
        Class index of each row (stratification key), same length as ``rows``.
    epoch : int
        Epoch number; each epoch gets a new shuffle.
    seed : int
        Seed shared by all ranks.
    rank, size : int
        This rank and the number of ranks.
    pad : bool
        Repeat a row on ranks that would otherwise get one row fewer, so all ranks
        get ``ceil(len(rows) / size)`` rows (see the module docstring).

    Returns
    -------
    ndarray of int64
        This rank's rows, shuffled.

    Raises
    ------
    InputError
        Fewer rows than ranks, mismatched lengths, or a rank outside ``[0, size)``.

    Examples
    --------
    >>> parts = [partition(range(10), [0] * 7 + [1] * 3, epoch=0, seed=1, rank=r, size=3)
    ...          for r in range(3)]
    >>> [len(p) for p in parts]
    [4, 4, 4]
    >>> sorted(set(np.concatenate(parts).tolist())) == list(range(10))
    True
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    size, rank = int(size), int(rank)
    if size < 1 or not 0 <= rank < size:
        raise InputError(f"rank {rank} is not in a world of {size} ranks", "partition")
    if labels.shape != rows.shape:
        raise InputError(f"{len(rows)} rows but {len(labels)} labels", "partition")
    if len(rows) < size:
        raise InputError(f"only {len(rows)} frames to share among {size} ranks; every rank "
                         "needs at least one (use more frames or fewer ranks)",
                         "partition")
    order = np.lexsort((rows, labels))  # canonical order: by class, then row
    rows, labels = rows[order], labels[order]
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x5EED])
    dealt = []
    for cls in np.unique(labels):
        members = rows[labels == cls]
        dealt.append(members[rng.permutation(len(members))])
    dealt = np.concatenate(dealt)
    # round-robin over the class-grouped sequence: position i goes to rank (i + shift) % size;
    # a per-epoch shift rotates which ranks get the extra frame of each class
    shift = int(rng.integers(size))
    mine = dealt[(np.arange(len(dealt)) + shift) % size == rank]
    mine = mine[np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), rank, 1])
                .permutation(len(mine))]
    if pad:
        per_rank = -(-len(rows) // size)
        if len(mine) < per_rank:
            mine = np.concatenate([mine, mine[:per_rank - len(mine)]])
    return mine


def steps_per_epoch(n_rows, size, batch_size, drop_remainder=False):
    """Steps every rank runs per epoch for :func:`partition` with ``pad=True``.

    Examples
    --------
    >>> steps_per_epoch(10, 3, batch_size=2)
    2
    """
    per_rank = -(-int(n_rows) // int(size))
    return per_rank // batch_size if drop_remainder else -(-per_rank // batch_size)
