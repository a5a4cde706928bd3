"""Score an unlabeled pool over MPI ranks (``suggest-labels --np N``).

Each rank scores a disjoint, contiguous slice of the pool rows (contiguous keeps every
rank's reads within few shards) and rank 0 gathers the slices in rank order, so the
result equals a single-process run. Selection and output then happen on rank 0 only.

Examples
--------
>>> split_rows(np.arange(10), rank=1, size=3).tolist()
[3, 4, 5]
>>> split_rows(np.arange(10), rank=1, size=3, align=4).tolist()
[4, 5, 6, 7]
>>> out = score_pool(lambda rows, offset: {"probs": np.ones((len(rows), 2)) / 2,
...                                "embedding": np.zeros((len(rows), 1)),
...                                "mc_probs": None, "member_probs": None},
...                  np.arange(5))
>>> out["probs"].shape
(5, 2)
"""
import numpy as np

from ..errors import LclsError


def split_bounds(n, rank, size, align=1):
    """``(start, stop)`` of rank ``rank``'s contiguous share of ``n`` rows.

    Shares are whole blocks of ``align`` rows (the last block may be short), so batch
    boundaries -- and with them the Monte-Carlo dropout seeds -- are the same for any
    number of ranks.
    """
    blocks = -(-n // align) if n else 0
    b0, b1 = (blocks * rank) // size, (blocks * (rank + 1)) // size
    return min(b0 * align, n), min(b1 * align, n)


def split_rows(rows, rank, size, align=1):
    """The contiguous slice of ``rows`` rank ``rank`` of ``size`` scores."""
    rows = np.asarray(rows)
    start, stop = split_bounds(len(rows), rank, size, align)
    return rows[start:stop]


def score_pool(score_fn, rows, world=None, align=1):
    """Run ``score_fn(rows_slice, offset) -> dict of arrays`` over ranks; rank 0 gets the merge.

    Parameters
    ----------
    score_fn : callable
        ``score_fn(rows, offset)``, ``offset`` being the position of ``rows[0]`` in the
        whole pool; returns a :func:`lcls_dl.active.suggest.pool_outputs`-style dict
        (frame axis first; ``mc_probs``/``member_probs`` frames on axis 1, or None).
    rows : array of int
        The whole pool (identical on every rank).
    world : World, optional
        ``LocalWorld``/``MPIWorld`` (or None: single process).
    align : int
        Rank shares are whole blocks of this many rows (use the scoring batch size).

    Returns
    -------
    dict on rank 0, None on other ranks.
    """
    from .suggest import merge_outputs

    if world is None or world.size <= 1:
        return score_fn(np.asarray(rows), 0)
    rows = np.asarray(rows)
    start, stop = split_bounds(len(rows), world.rank, world.size, align)
    try:
        mine, error = score_fn(rows[start:stop], start), None
    except Exception as exc:  # every rank must still reach the gather, or the others hang
        mine, error = None, exc
    sent = (mine, None if error is None else f"{type(error).__name__}: {error}")
    comm = getattr(world, "comm", None)
    if comm is not None:
        pieces = comm.gather(sent, root=0)
    else:
        pieces = world.allgather_object(sent)
    if error is not None:
        raise error
    if not world.is_root:
        return None
    failed = [(rank, msg) for rank, (_, msg) in enumerate(pieces) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise LclsError(f"scoring failed on rank {rank}: {msg}")
    return merge_outputs([piece for piece, _ in pieces])


def get_world():
    """The MPI world this process runs in (``MPIWorld`` under mpiexec with >1 ranks), else local."""
    from ..distributed.mpi_world import get_world as _get_world

    return _get_world()
