"""Gradient-averaging throughput: lcls-dl's allreduce paths vs a raw mpi4py Allreduce.

For model sizes from 0.1M to 25M float32 parameters (split into a realistic list of
per-layer gradient arrays), time one step's gradient averaging:

- "raw": ``comm.Allreduce(MPI.IN_PLACE, flat, MPI.SUM)`` on one preallocated flat
  float32 NumPy buffer of the same bytes (the reference: no packing, no averaging,
  nothing returned);
- "raw, A/A": the same on a second NumPy buffer. It measures nothing but the noise of
  the measurement: its "overhead" should be near 0;
- "raw, step's tensors": the least mpi4py code that reduces the buffers the compiled
  step just returned, ``comm.Allreduce(MPI.IN_PLACE, t._numpy(), MPI.SUM)`` per
  tensor. Against it, the zero-copy row's overhead is lcls-dl's own code alone (column
  "vs tensors"), with the same memory and the same call into TensorFlow;
- "raw, step's memory": the same ``Allreduce`` calls with the views taken before the
  clock starts. With "raw" it shows where the memory lies (TF's allocator vs NumPy's:
  huge pages or not) and what the first ``_numpy()`` of a fresh tensor costs;
- "zero-copy (train default)": what ``lcls-dl train --np N`` does. The compiled gradient
  step returns the gradients below 512 KiB concatenated into one flat tensor and the
  larger ones as they are, with 1/N folded into the loss
  (:class:`lcls_dl.distributed.gradient_fusion.FusionPlan`); the timed path is
  :class:`~lcls_dl.distributed.gradient_fusion.TensorReducer` on those fresh tensors:
  zero-copy views of their memory and one in-place ``Allreduce`` per buffer (16 MiB
  pieces at most); the tensors then go to the compiled update as they are. Column
  "fusion ms" is what the concatenation adds to the compiled step (measured on the same
  gradients, one TF thread per rank), "+fusion" the overhead counting it;
- "numpy list": ``GradientAverager(grads)`` on numpy arrays, the path of the user Keras
  API (``DistributedOptimizer``) and of compression: small arrays packed into fused 1 MiB
  buckets, large ones reduced in place in 1 MiB chunks, everything scaled by 1/size
  ("average"), or not ("sum", for a loop that folds 1/size into its loss).

Every repetition runs, for each variant in a random order (the same on all ranks): a
barrier, the compiled gradient step (untimed: it stands for the backward pass and leaves
the caches as training does), then the timed averaging. A repetition's time is its
slowest rank's. Sub-millisecond collectives on a shared machine scatter by 10-20% from
one call to the next, so each size gets ``--seconds`` of repetitions (up to 3000) and
the table reports medians: GB/s of gradient bytes (4 * params / seconds), the overhead
``median(lcls) / median(raw) - 1`` (target <= 10%) and its 90% bootstrap interval over
repetitions. Extra rows (``--extras``): other bucket sizes, everything packed
(``inplace=False``), overlap, fp16/bf16 compression.

Run (starts 2 ranks itself when not under mpiexec)::

    python benchmarks/allreduce_bench.py [--np 2] [--seconds 4] [--sizes 0.1,0.5,1,5,25]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0,
                    help="measuring time per model size (sets the repetitions)")
    ap.add_argument("--reps", type=int, default=None,
                    help="a fixed number of repetitions instead of --seconds")
    ap.add_argument("--sizes", default="0.1,0.5,1,5,25", help="millions of parameters")
    ap.add_argument("--extras", action="store_true", help="also bucket sizes, overlap, fp16/bf16")
    ap.add_argument("--fuse-below", default="",
                    help="also the zero-copy path with these fusion thresholds (KiB, comma list)")
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

    comm = MPI.COMM_WORLD
    tf = _tensorflow()
    root = comm.Get_rank() == 0
    if root:
        print(f"np={comm.Get_size()}  MPI: {MPI.Get_library_version().splitlines()[0]}")
        print(f"{'params':>8} {'MB':>6} {'variant':<26} {'reps':>5} {'GB/s':>6} {'ms':>7} "
              f"{'overhead':>9} {'90% interval':>16} {'fusion ms':>10} {'+fusion':>8} "
              f"{'vs tensors':>11}")
    for millions in [float(s) for s in args.sizes.split(",")]:
        rows = measure_size(tf, comm, millions, args)
        if root:
            for row in rows:
                print(row, flush=True)


def _tensorflow():
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # one compute thread per rank
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def measure_size(tf, comm, millions, args):
    """Time every variant for a model of ``millions`` parameters; table rows on rank 0."""
    from mpi4py import MPI

    from lcls_dl.distributed.gradient_averager import GradientAverager
    from lcls_dl.distributed.gradient_fusion import FusionPlan, TensorReducer
    from lcls_dl.distributed.mpi_world import MPIWorld

    shapes = layer_shapes(millions * 1e6)
    rng = np.random.default_rng(comm.Get_rank())
    grads = [rng.normal(size=s).astype(np.float32) for s in shapes]
    n = sum(g.size for g in grads)
    inputs = [tf.constant(g) for g in grads]
    plans = {None: FusionPlan(shapes)}
    plans.update({kib: FusionPlan(shapes, fuse_below=int(kib) << 10)
                  for kib in args.fuse_below.split(",") if kib})
    # "* 1.0" stands for the backward pass: every gradient is a fresh tensor
    steps = {k: tf.function(lambda gs, plan=plan: plan.fuse([g * 1.0 for g in gs]))
             for k, plan in plans.items()}
    fusion = {k: fusion_cost(tf, plan, inputs) for k, plan in plans.items()}

    flat = np.concatenate([g.ravel() for g in grads])
    flat_aa = flat.copy()

    def raw(_):
        comm.Allreduce(MPI.IN_PLACE, flat, MPI.SUM)

    def raw_aa(_):
        comm.Allreduce(MPI.IN_PLACE, flat_aa, MPI.SUM)

    def raw_step_memory(views):
        for v in views:
            comm.Allreduce(MPI.IN_PLACE, v, MPI.SUM)

    def raw_step_tensors(tensors):
        for t in tensors:
            comm.Allreduce(MPI.IN_PLACE, t._numpy(), MPI.SUM)

    variants = {"raw": raw, "raw, A/A": raw_aa, "raw, step's tensors": raw_step_tensors,
                "raw, step's memory": raw_step_memory,
                "zero-copy (train default)": TensorReducer(MPIWorld(comm))}
    step_of = {}  # variant -> fusion threshold of the step it runs after
    for kib in plans:
        if kib is not None:
            name = f"zero-copy, fuse < {kib} KiB"
            variants[name], step_of[name] = TensorReducer(MPIWorld(comm)), kib
    numpy_kw = {"numpy list, average": {},
                # a loop that folds 1/N into its loss only needs a sum
                "numpy list, sum": {"average": False}}
    if args.extras:
        numpy_kw.update({"numpy bucket 256K": {"bucket_bytes": 256 << 10},
                         "numpy bucket 4M": {"bucket_bytes": 4 << 20},
                         "numpy bucket 16M": {"bucket_bytes": 16 << 20},
                         "numpy all packed": {"inplace": False},
                         "numpy overlap": {"overlap": True},
                         "numpy fp16": {"compression": "fp16"},
                         "numpy bf16": {"compression": "bf16"}})
    for name, kw in numpy_kw.items():
        mine = [g.copy() for g in grads]  # in-place sums change them: timing only
        variants[name] = lambda _, avg=GradientAverager(comm, **kw), mine=mine: avg(mine)
    views_first = {"raw, step's memory"}  # views taken before the clock starts

    def one(name):
        comm.Barrier()
        bufs = steps[step_of.get(name)](inputs)
        arg = [b._numpy() for b in bufs] if name in views_first else bufs
        t0 = time.perf_counter()
        variants[name](arg)
        return time.perf_counter() - t0

    for name in variants:  # warm up (plans, first calls)
        one(name), one(name)
    t_one = comm.allreduce(sum(one(name) for name in variants) + 1e-4, op=MPI.MAX)
    reps = args.reps or int(np.clip(args.seconds / t_one, 15, 3000))
    reps = comm.bcast(reps)
    times = {name: np.empty(reps) for name in variants}
    order = np.random.default_rng(12345)  # the same order on every rank
    names = list(variants)
    for i in range(reps):
        for k in order.permutation(len(names)):
            times[names[k]][i] = one(names[k])
    # the slowest rank decides a collective's time
    slowest = {name: np.max(comm.allgather(t), axis=0) for name, t in times.items()}
    if comm.Get_rank() != 0:
        return []
    ref = slowest["raw"]
    rows = []
    boot = np.random.default_rng(0).integers(0, reps, size=(1000, reps))
    for name, t in slowest.items():
        med = float(np.median(t))
        over = med / float(np.median(ref)) - 1
        # paired bootstrap over repetitions: resample whole repetitions
        ratios = np.median(t[boot], axis=1) / np.median(ref[boot], axis=1) - 1
        lo, hi = np.percentile(ratios, [5, 95])
        extra = ""
        if name.startswith("zero-copy"):
            cost = fusion[step_of.get(name)]
            plus = (med + cost) / float(np.median(ref)) - 1
            extra = f" {cost * 1e3:>10.2f} {plus * 100:>7.1f}%"
            if name == "zero-copy (train default)":  # same buffers as "raw, step's tensors"
                own = med / float(np.median(slowest["raw, step's tensors"])) - 1
                extra += f" {own * 100:>10.1f}%"
        interval = "" if name == "raw" else f"[{lo * 100:+.1f}, {hi * 100:+.1f}]%"
        rows.append(f"{n / 1e6:>7.2f}M {4 * n / 2**20:>6.1f} {name:<26} {reps:>5} "
                    f"{4 * n / 1e9 / med:>6.2f} {med * 1e3:>7.3f} {over * 100:>8.1f}% "
                    f"{interval:>16}{extra}")
    return rows


def fusion_cost(tf, plan, inputs, reps=15):
    """Seconds the in-step concatenation adds: best of ``reps`` of a step returning the
    gradients fused minus one returning them as they are."""
    fused_step = tf.function(lambda gs: plan.fuse([g * 1.0 for g in gs]))
    plain_step = tf.function(lambda gs: [g * 1.0 for g in gs])
    t_fused, t_plain = [], []
    for _ in range(reps + 1):
        for step, ts in ((fused_step, t_fused), (plain_step, t_plain)):
            t0 = time.perf_counter()
            step(inputs)  # eager calls on the CPU return when the outputs are computed
            ts.append(time.perf_counter() - t0)
    return max(0.0, min(t_fused[1:]) - min(t_plain[1:]))


if __name__ == "__main__":
    main()
