"""Gradient-averaging throughput: lcls-dl's allreduce paths vs a raw mpi4py Allreduce.

For model sizes from 0.1M to 25M float32 parameters (split into a realistic list of
per-layer gradient arrays), time

- raw:  ``comm.Allreduce(MPI.IN_PLACE, flat, MPI.SUM)`` on one preallocated flat float32
  buffer of the same bytes (the floor: no packing, no averaging, nothing returned);
- "zero-copy (train default)": what ``lcls-dl train --np N`` does. The compiled gradient
  step returns the gradients below 4 MiB concatenated into one flat tensor and the larger
  ones as they are, with 1/N folded into the loss
  (:class:`lcls_dl.distributed.gradient_fusion.FusionPlan`); the timed path is
  :class:`~lcls_dl.distributed.gradient_fusion.TensorReducer`: DLPack views of those
  TF tensors and one in-place ``Allreduce`` per buffer (16 MiB pieces at most), the
  tensors then go to the compiled update as they are. Column "fusion ms" is what the
  concatenation adds to the compiled step (measured on the same gradients, one TF
  thread per rank), "+fusion" the overhead counting it;
- "numpy list": ``GradientAverager(grads)`` on numpy arrays, the path of the user Keras
  API (``DistributedOptimizer``) and of compression: small arrays packed into fused 1 MiB
  buckets, large ones reduced in place in 1 MiB chunks, everything scaled by 1/size
  ("average"), or not ("sum", for a loop that folds 1/size into its loss);

interleaved (raw, lcls-dl, raw, ...) so both see the same machine load, and report the
best (minimum) time of each as GB/s of gradient bytes (4 * params / seconds) and the
overhead ``t_lcls / t_raw - 1`` (target <= 10%), plus the overhead of the medians (on
a machine shared with other jobs the minimum is the stable statistic). Extra rows
(``--extras``): other bucket sizes, everything packed (``inplace=False``), overlap,
fp16/bf16 compression.

Run (starts 2 ranks itself when not under mpiexec)::

    python benchmarks/allreduce_bench.py [--np 2] [--reps 15] [--sizes 0.1,1,5,25]
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np


def layer_shapes(n_params):
    """Per-layer gradient shapes of a conv net with about ``n_params`` parameters."""
    # widths grow like a CNN: a few small conv layers, then a large dense layer
    fractions = [0.002, 0.01, 0.04, 0.12, 0.25, 0.5, 0.07, 0.008]
    shapes = []
    for i, f in enumerate(fractions):
        n = max(16, int(n_params * f))
        cols = 64 if n >= 64 * 16 else 16
        shapes.append((n // cols, cols))
        shapes.append((cols,))  # bias
    return shapes


def timed(fn, comm):
    comm.Barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--sizes", default="0.1,1,5,25", help="millions of parameters")
    ap.add_argument("--extras", action="store_true", help="also bucket sizes, overlap, fp16/bf16")
    args = ap.parse_args()

    from lcls_dl.distributed.launcher import in_mpi_job

    if not in_mpi_job():
        from lcls_dl.distributed.launcher import rank_environment

        env = rank_environment()  # what lcls-dl's launcher gives its ranks
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        cmd = [mpiexec, "-n", str(args.np), "--oversubscribe", "--bind-to", "none",
               sys.executable, *sys.argv]
        sys.exit(subprocess.run(cmd, env=env).returncode)

    from mpi4py import MPI

    from lcls_dl.distributed.allreduce import GradientAverager

    comm = MPI.COMM_WORLD
    root = comm.Get_rank() == 0
    if root:
        print(f"np={comm.Get_size()}  reps={args.reps}  MPI: {MPI.Get_library_version().splitlines()[0]}")
        print(f"{'params':>8} {'MB':>7} {'variant':<26} {'raw GB/s':>9} {'lcls GB/s':>10} "
              f"{'raw ms':>8} {'lcls ms':>8} {'overhead':>9} {'(median)':>9} "
              f"{'fusion ms':>10} {'+fusion':>8}")
    variants = [("zero-copy (train default)", "tensors"),
                ("numpy list, average", {}),
                # a loop that folds 1/N into its loss only needs a sum
                ("numpy list, sum", {"average": False})]
    if args.extras:
        variants += [("numpy bucket 256K", {"bucket_bytes": 256 << 10}),
                     ("numpy bucket 4M", {"bucket_bytes": 4 << 20}),
                     ("numpy bucket 16M", {"bucket_bytes": 16 << 20}),
                     ("numpy all packed", {"inplace": False}),
                     ("numpy overlap", {"overlap": True}),
                     ("numpy fp16", {"compression": "fp16"}),
                     ("numpy bf16", {"compression": "bf16"})]
    tf = None
    for millions in [float(s) for s in args.sizes.split(",")]:
        shapes = layer_shapes(millions * 1e6)
        rng = np.random.default_rng(comm.Get_rank())
        grads = [rng.normal(size=s).astype(np.float32) for s in shapes]
        n = sum(g.size for g in grads)
        for name, kw in variants:
            flat = np.concatenate([g.ravel() for g in grads])
            fusion = None
            if kw == "tensors":
                tf = tf or _tensorflow()
                ours, fusion = zero_copy_path(tf, comm, shapes, grads, args.reps)
            else:
                # fresh inputs per variant: in-place sums double the values every call
                mine = [g.copy() for g in grads]
                avg = GradientAverager(comm, **kw)
                avg(mine)  # plan + warm up
                ours = lambda avg=avg, mine=mine: avg(mine)  # noqa: E731
            comm.Allreduce(MPI.IN_PLACE, flat, MPI.SUM)
            t_raw, t_ours = [], []
            reps = args.reps if "fp16" not in name and "bf16" not in name else max(3, args.reps // 3)
            for _ in range(reps):
                t_raw.append(timed(lambda: comm.Allreduce(MPI.IN_PLACE, flat, MPI.SUM), comm))
                t_ours.append(timed(ours, comm))
            # the slowest rank decides a collective's time
            tr = comm.allreduce(float(np.min(t_raw)), op=MPI.MAX)
            to = comm.allreduce(float(np.min(t_ours)), op=MPI.MAX)
            mr = comm.allreduce(float(np.median(t_raw)), op=MPI.MAX)
            mo = comm.allreduce(float(np.median(t_ours)), op=MPI.MAX)
            if fusion is not None:
                fusion = comm.allreduce(fusion, op=MPI.MAX)
            if root:
                gb = 4 * n / 1e9
                extra = (f"{fusion * 1e3:>10.2f} {((to + fusion) / tr - 1) * 100:>7.1f}%"
                         if fusion is not None else "")
                print(f"{n / 1e6:>7.2f}M {4 * n / 2**20:>7.1f} {name:<26} {gb / tr:>9.2f} "
                      f"{gb / to:>10.2f} {tr * 1e3:>8.2f} {to * 1e3:>8.2f} "
                      f"{(to / tr - 1) * 100:>8.1f}% {(mo / mr - 1) * 100:>8.1f}% {extra}",
                      flush=True)


def _tensorflow():
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # one compute thread per rank
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def zero_copy_path(tf, comm, shapes, grads, reps):
    """The training loop's path, from the compiled step's outputs to tensors to apply.

    Returns ``(run, fusion_s)``: ``run()`` sums one step's fused buffers over ranks in
    place (``TensorReducer``: DLPack views + ``Allreduce(IN_PLACE)`` per buffer), and
    ``fusion_s``, the extra time the compiled step spends concatenating the small
    gradients (best of ``reps`` of a step that returns them fused minus one that
    returns them as they are), which the training step pays instead of the copies.
    """
    from lcls_dl.distributed.gradient_fusion import FusionPlan, TensorReducer
    from lcls_dl.distributed.mpi_world import MPIWorld

    plan = FusionPlan(shapes)
    inputs = [tf.constant(g) for g in grads]
    # "* 1.0" stands for the backward pass: every gradient is a fresh tensor
    fused_step = tf.function(lambda gs: plan.fuse([g * 1.0 for g in gs]))
    plain_step = tf.function(lambda gs: [g * 1.0 for g in gs])
    t_fused, t_plain = [], []
    for _ in range(reps + 1):
        for step, ts in ((fused_step, t_fused), (plain_step, t_plain)):
            t0 = time.perf_counter()
            step(inputs)  # eager calls on the CPU return when the outputs are computed
            ts.append(time.perf_counter() - t0)
    fusion = max(0.0, min(t_fused[1:]) - min(t_plain[1:]))
    reducer = TensorReducer(MPIWorld(comm))
    state = {"bufs": fused_step(inputs)}
    reducer(state["bufs"])  # warm up

    def run():
        reducer(state["bufs"])  # the same buffers again: only the time matters here
    return run, fusion


if __name__ == "__main__":
    main()
