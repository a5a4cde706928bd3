"""Data-parallel training over MPI: partitioning, gradient averaging, the Keras API, launch.

Tests marked ``mpi`` start real ranks with ``mpiexec -n 2 --oversubscribe`` (or
``lcls-dl run --np 2``) in a subprocess with a timeout, so a hang fails instead of
stalling CI.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from helpers_data import make_dataset
from lcls_dl.distributed.partition import partition, steps_per_epoch
from lcls_dl.errors import InputError

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
needs_mpi = pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK), reason="no mpiexec next to python")


def mpirun(script, args, cwd, n=2, timeout=120):
    """Run ``python script args`` on ``n`` ranks; return the CompletedProcess."""
    from lcls_dl.distributed.launcher import rank_environment

    # the environment lcls-dl's launcher gives its ranks (root permission, shared memory)
    env = dict(rank_environment(), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [MPIEXEC, "-n", str(n), "--oversubscribe", "--bind-to", "none",
           sys.executable, str(script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_public_names_survive_submodule_imports():
    # a submodule named like a public function replaces it on the package once imported
    import importlib
    import pkgutil
    import types

    import lcls_dl.distributed as ld

    for mod in pkgutil.iter_modules(ld.__path__):
        importlib.import_module(f"lcls_dl.distributed.{mod.name}")
    for name in ld.__all__:
        assert not isinstance(getattr(ld, name), types.ModuleType), name
    assert callable(ld.allreduce) and ld.allreduce(3.0) == 3.0   # one process: itself


# ------------------------------------------------------------------ partition (one process)
def _parts(n, labels, size, epoch=0, seed=7, pad=True):
    return [partition(np.arange(100, 100 + n), labels, epoch, seed, r, size, pad=pad)
            for r in range(size)]


@pytest.mark.parametrize("n,size", [(103, 4), (10, 3), (8, 8), (57, 2)])
def test_partition_disjoint_complete_equal(n, size):
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 3, n)
    parts = _parts(n, labels, size, pad=False)
    allrows = np.concatenate(parts)
    assert len(allrows) == n and len(np.unique(allrows)) == n      # disjoint and complete
    assert set(allrows.tolist()) == set(range(100, 100 + n))
    padded = _parts(n, labels, size)
    assert {len(p) for p in padded} == {-(-n // size)}            # equal steps on every rank
    for p, q in zip(parts, padded):
        assert set(q.tolist()) == set(p.tolist())                   # padding repeats own rows
        assert len(q) - len(np.unique(q)) <= 1


def test_partition_stratified_rare_class_spread():
    labels = np.array([0] * 90 + [1] * 6 + [2] * 7)  # ice (1) is rare
    rows = np.arange(len(labels))
    for epoch in range(3):
        parts = [partition(rows, labels, epoch, 3, r, 3, pad=False) for r in range(3)]
        for cls in range(3):
            counts = [int(np.sum(labels[p] == cls)) for p in parts]
            n_cls = int(np.sum(labels == cls))
            assert set(counts) <= {n_cls // 3, -(-n_cls // 3)}, (cls, counts)


def test_partition_reshuffles_each_epoch_and_is_reproducible():
    labels = np.zeros(64, int)
    a0 = partition(np.arange(64), labels, 0, 11, 0, 2)
    assert np.array_equal(a0, partition(np.arange(64), labels, 0, 11, 0, 2))
    # input order does not matter: every rank may list rows differently
    perm = np.random.default_rng(1).permutation(64)
    assert np.array_equal(a0, partition(np.arange(64)[perm], labels[perm], 0, 11, 0, 2))
    assert not np.array_equal(a0, partition(np.arange(64), labels, 1, 11, 0, 2))
    assert not np.array_equal(a0, partition(np.arange(64), labels, 0, 12, 0, 2))


def test_partition_fewer_frames_than_ranks_is_an_error():
    with pytest.raises(InputError, match="only 3 frames to share among 4 ranks"):
        partition([1, 2, 3], [0, 1, 0], 0, 0, 0, 4)
    with pytest.raises(InputError, match="rows but"):
        partition([1, 2, 3], [0, 1], 0, 0, 0, 1)
    with pytest.raises(InputError, match="not in a world"):
        partition([1, 2, 3], [0, 1, 0], 0, 0, 2, 2)


def test_steps_per_epoch_matches_partition():
    parts = _parts(23, np.zeros(23, int), 4)
    assert steps_per_epoch(23, 4, 2) == -(-len(parts[0]) // 2) == 3
    assert steps_per_epoch(23, 4, 2, drop_remainder=True) == 3


# ------------------------------------------------------------------ averager (one process)
def test_gradient_averager_single_rank_buckets_and_reuse():
    from mpi4py import MPI

    from lcls_dl.distributed.gradient_averager import GradientAverager

    rng = np.random.default_rng(0)
    grads = [rng.normal(size=s).astype(np.float32) for s in [(3, 3), (1000,), (0,), (7, 11, 5)]]
    avg = GradientAverager(MPI.COMM_SELF, bucket_bytes=1024)
    out = avg(grads)
    assert [o.shape for o in out] == [g.shape for g in grads]
    assert all(np.array_equal(o, g) for o, g in zip(out, grads))
    total = sum(g.size for g in grads)
    assert avg.n_buckets == -(-total * 4 // 1024) and avg.nbytes == total * 4
    buf = out[1].base
    out2 = avg([g * 2 for g in grads])
    assert out2[1].base is buf                       # the same preallocated buffer
    assert np.array_equal(out2[3], grads[3] * 2)
    wider = avg(grads + [np.ones(5, np.float64)])    # new layout: replanned, float64 buffer
    assert wider[0].dtype == np.float64 and np.array_equal(wider[-1], np.ones(5))
    with pytest.raises(InputError):
        GradientAverager(MPI.COMM_SELF, compression="int8")
    with pytest.raises(InputError):
        avg([np.arange(3)])


@pytest.mark.parametrize("compression,rel", [("fp16", 2.0 ** -10), ("bf16", 2.0 ** -7)])
def test_gradient_averager_compression_accuracy_single_rank(compression, rel):
    from mpi4py import MPI

    from lcls_dl.distributed.gradient_averager import GradientAverager

    g = np.random.default_rng(1).normal(size=5000).astype(np.float32)
    out = GradientAverager(MPI.COMM_SELF, bucket_bytes=4096, compression=compression)([g])[0]
    assert not np.array_equal(out, g)                            # really rounded
    assert np.max(np.abs(out - g) / np.maximum(np.abs(g), 1e-3)) <= rel


# ------------------------------------------------------------------ batch scripts
@pytest.mark.parametrize("scheduler,marker,launch", [
    ("slurm", "#SBATCH --signal=B:USR1@300", "srun --mpi=pmix --ntasks=8"),
    ("pbs", "#PBS -l select=2:ncpus=4:mpiprocs=4",
     'mpirun -n 8 --map-by ppr:4:node --bind-to none --hostfile "$PBS_NODEFILE" --with-ft ulfm'),
    ("lsf", "#BSUB -wa USR1 -wt 5", 'mpirun -n 8 --map-by ppr:4:node --bind-to none '
                                    '--hostfile "$LSB_DJOB_HOSTFILE" --with-ft ulfm')])
def test_batch_script_text_is_valid_bash(scheduler, marker, launch, tmp_path):
    from lcls_dl.cli.batch_script import make_batch_script

    text = make_batch_script(["train", "my data", "--out", "m"], scheduler, 2, 4,
                             time="02:00:00", venv="/opt/venv", modules=["gcc", "openmpi"])
    assert marker in text and launch in text
    assert "source /opt/venv/bin/activate" in text and "module load gcc openmpi" in text
    assert "lcls-dl train 'my data' --out m" in text
    path = tmp_path / "job.sh"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # ranks started by srun/jsrun/mpirun get the malloc tunables lcls-dl's launcher sets
    (line,) = [ln for ln in text.splitlines() if ln.startswith("export GLIBC_TUNABLES=")]
    huge = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:" \
           "glibc.malloc.trim_threshold=67108864"
    for before, after in (("", huge), ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:" + huge)):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if before:
            env["GLIBC_TUNABLES"] = before
        out = subprocess.run(["bash", "-c", line + '\necho "$GLIBC_TUNABLES"'], env=env,
                             capture_output=True, text=True).stdout.strip()
        assert out == after


def test_batch_script_resubmission_resumes_and_mpirun_forwards_the_environment(tmp_path):
    from lcls_dl.cli.batch_script import make_batch_script

    text = make_batch_script(["train", "d", "--out", "my model"], "pbs", 2, 2, time="90")
    assert "#PBS -l walltime=01:30:00" in text                 # 90 = minutes, as in Slurm
    (launch,) = [ln for ln in text.splitlines() if ln.startswith("mpirun ")]
    assert "-x PATH -x GLIBC_TUNABLES" in launch and launch.endswith("--out 'my model' $resume &")
    assert "kill $timer" in text                               # the PBS timer does not outlive it
    # the lines that pick --resume, run where the model directory has a checkpoint or not
    start = text.index("resume=\n")
    pick = text[start:text.index("\n", text.index("compgen", start))] + '\necho "[$resume]"'
    ck = tmp_path / "my model" / "checkpoints"
    ck.mkdir(parents=True)
    runs = []
    for name in (None, "epoch-0003-step-000007.npz"):
        if name:
            (ck / name).write_bytes(b"")
        runs.append(subprocess.run(["bash", "-c", pick], cwd=tmp_path, capture_output=True,
                                   text=True).stdout.strip())
    assert runs == ["[]", "[--resume]"]
    # already --resume, or no fault tolerance wanted: nothing added
    other = make_batch_script(["train", "d", "--out", "m", "--resume", "--no-fault-tolerance"],
                              "lsf", 1, 2)
    assert "compgen" not in other and "--with-ft" not in other


def test_batch_script_cli_and_errors(cli):
    proc = cli("batch-script", "--scheduler", "slurm", "--nodes", "3", "--ranks-per-node", "2",
               "--launcher", "mpirun", "--time", "00:20:00", "--", "train", "d", "--out", "m",
               timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=3" in proc.stdout and "#SBATCH --time=00:20:00" in proc.stdout
    assert "mpirun -n 6" in proc.stdout and "lcls-dl train d --out m" in proc.stdout
    bad = cli("batch-script", "--scheduler", "pbs", "--time", "soon", "--", "train", "d",
              "--out", "m", timeout=60)
    assert bad.returncode == 1 and "lcls-dl: error: time limit 'soon'" in bad.stderr
    # what the job would refuse after its wait in the queue is refused now
    for command, said in ((["trian", "d"], "unknown lcls-dl command 'trian'"),
                          (["train", "d", "--out", "m", "--bogus"], "No such option '--bogus'"),
                          (["train", "d", "--out", "m", "--np", "4"], "--np does not belong")):
        proc = cli("batch-script", "--scheduler", "slurm", "--", *command, timeout=60)
        assert proc.returncode == 1 and not proc.stdout, command
        assert proc.stderr.startswith("lcls-dl: error: ") and said in proc.stderr, proc.stderr
    pbs = cli("batch-script", "--scheduler", "pbs", "--", "train", "d", "--out", "m", timeout=60)
    assert 'cd "${PBS_O_WORKDIR:-.}"' in pbs.stdout      # PBS starts jobs in $HOME


# ------------------------------------------------------------------ real ranks
AVERAGER_SCRIPT = """
    import json, sys
    import numpy as np
    from lcls_dl.distributed.mpi_world import MPIWorld
    from lcls_dl.distributed.gradient_averager import GradientAverager

    world = MPIWorld()
    rng = np.random.default_rng(10 + world.rank)
    grads = [rng.normal(size=s).astype(np.float32) for s in [(3, 3), (4000,), (0,), (9, 70)]]
    every = world.allgather_object(grads)
    exact = [np.mean([np.float64(e[i]) for e in every], axis=0) for i in range(len(grads))]
    res = {"size": world.size}
    variants = [(c, o, 1 << 20) for c in (None, "fp16", "bf16") for o in (False, True)]
    variants += [(None, False, 1024), (None, True, 1024)]   # big arrays reduced in place
    for comp, overlap, direct in variants:
        avg = GradientAverager(world.comm, bucket_bytes=2048, compression=comp,
                               overlap=overlap, direct_bytes=direct)
        for _ in range(2):          # buffers reused; inputs may be overwritten
            mine = [g.copy() for g in grads]
            out = avg(mine)
        if direct == 1024:
            assert out[1] is mine[1] and out[0] is not mine[0]
        # error relative to the size of the summands (sums may cancel)
        scale = [np.mean([np.abs(e[i]) for e in every], axis=0) for i in range(len(grads))]
        err = max(float(np.max(np.abs(o - e) / np.maximum(s, 1e-3), initial=0))
                  for o, e, s in zip(out, exact, scale))
        same = world.allgather_object([o.tobytes() for o in out])
        key = f"{comp}-{overlap}" + ("-direct" if direct == 1024 else "")
        res[key] = {"err": err, "buckets": avg.n_buckets, "calls": avg.n_calls,
                    "identical": same[0] == same[1]}
    # the zero-copy path: each buffer summed in its own memory, in 1 KiB chunks
    mine = [g.copy() for g in grads]
    GradientAverager(world.comm, chunk_bytes=1024).sum_in_place(mine)
    res["inplace_err"] = max(float(np.max(np.abs(m - world.size * e), initial=0))
                             for m, e in zip(mine, exact))
    ro = np.ones(3, np.float32)
    ro.flags.writeable = False
    try:  # refused by mpi4py before any rank communicates: every rank gets the error
        GradientAverager(world.comm).sum_in_place([ro])
        res["read_only"] = "accepted"
    except Exception as exc:
        res["read_only"] = f"{type(exc).__name__}: {exc}"
    res["sum"] = world.allreduce_sum(world.rank + 1)
    res["agree_mixed"] = world.agree(world.rank == 0)
    res["agree_all"] = world.agree(True)
    b = [np.full(5, world.rank + 3.0)]
    world.broadcast(b, root=1)
    res["bcast"] = b[0].tolist()
    res["obj"] = world.bcast_object({"r": world.rank}, root=0)
    if world.rank == 0:
        json.dump(res, open(sys.argv[1], "w"))
"""


@pytest.mark.mpi
@needs_mpi
def test_gradient_averager_two_ranks(tmp_path):
    script = write_script(tmp_path, "avg.py", AVERAGER_SCRIPT)
    proc = mpirun(script, [tmp_path / "res.json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["size"] == 2
    for overlap in ("False", "True"):
        assert res[f"None-{overlap}"]["err"] < 1e-6
        assert res[f"None-{overlap}-direct"]["err"] < 1e-6
        assert res[f"fp16-{overlap}"]["err"] < 2.0 ** -9
        assert res[f"bf16-{overlap}"]["err"] < 2.0 ** -6
        assert res[f"fp16-{overlap}"]["err"] > 0                 # really compressed
    assert all(v["identical"] for k, v in res.items() if isinstance(v, dict) and "err" in v)
    assert res["None-False"]["buckets"] == -(-(9 + 4000 + 630) * 4 // 2048)
    # direct: 4000- and 630-float arrays in 512-float chunks, the 9 floats packed
    assert res["None-False-direct"]["calls"] == 1 + 8 + 2
    assert res["inplace_err"] < 1e-5
    assert res["read_only"].startswith("InputError: in-place allreduce needs contiguous")
    assert res["sum"] == 3 and res["agree_mixed"] is False and res["agree_all"] is True
    assert res["bcast"] == [4.0] * 5 and res["obj"] == {"r": 0}


EQUIV_SCRIPT = """
    # One SGD training loop, as lcls-dl's trainer runs it: per-rank batch B, gradients
    # averaged with world.allreduce_mean. np=1 takes batch 2B over the same frames.
    import sys
    import numpy as np
    import lcls_dl.distributed as ld
    from lcls_dl.distributed.mpi_world import get_world

    world = get_world(bucket_bytes=4096)
    ld.init(threads=True)
    import keras
    import tensorflow as tf
    tf.config.experimental.enable_op_determinism()
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6, 6, 1))
    y = (x[:, :3].mean(axis=(1, 2, 3)) > x[:, 3:].mean(axis=(1, 2, 3))).astype("int64")
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3, activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    init = [w.copy() for w in model.get_weights()]
    init = world.broadcast(init)
    model.set_weights(init)
    opt = keras.optimizers.SGD(learning_rate=0.1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    B = 8 // world.size                       # per-rank batch; global batch 8
    for step in range(6):
        lo = step * 8 + world.rank * B
        with tf.GradientTape() as tape:
            loss = loss_fn(y[lo:lo + B], model(x[lo:lo + B], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        grads = world.allreduce_mean([g.numpy() for g in grads])
        opt.apply(grads, model.trainable_variables)
    np.savez(f"{sys.argv[1]}-rank{world.rank}.npz", *model.get_weights(), *init)
"""


@pytest.mark.mpi
@pytest.mark.slow
@needs_mpi
def test_np2_matches_np1_with_double_batch_and_ranks_agree_bitwise(tmp_path):
    script = write_script(tmp_path, "equiv.py", EQUIV_SCRIPT)
    one = mpirun(script, [tmp_path / "np1"], tmp_path, n=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = mpirun(script, [tmp_path / "np2"], tmp_path, n=2)
    assert two.returncode == 0, two.stderr[-3000:]
    w1 = np.load(tmp_path / "np1-rank0.npz")
    r0, r1 = np.load(tmp_path / "np2-rank0.npz"), np.load(tmp_path / "np2-rank1.npz")
    keys = sorted(w1.files, key=lambda k: int(k.split("_")[1]))
    n = len(keys) // 2
    trained, initial = keys[:n], keys[n:]
    for k in keys:
        assert r0[k].tobytes() == r1[k].tobytes(), f"ranks differ in {k}"
    for k in initial:                                 # same start on both runs
        assert np.array_equal(w1[k], r0[k])
    for k, k0 in zip(trained, initial):
        assert not np.allclose(w1[k], w1[k0])         # training moved the weights
        np.testing.assert_allclose(r0[k], w1[k], rtol=1e-9, atol=1e-12)


USER_SCRIPT = """
    # A user's own Keras 3 script, made data-parallel with lcls_dl.distributed
    import sys
    import numpy as np
    import lcls_dl.distributed as ld

    ld.init()
    import keras
    keras.utils.set_random_seed(100 + ld.rank())   # different init per rank on purpose
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8, 8, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int64")
    xs, ys = ld.shard(x, y, labels=y, seed=1)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    opt = ld.DistributedOptimizer(keras.optimizers.Adam(ld.scale_lr(2e-3)))
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    hist = model.fit(xs, ys, batch_size=20, epochs=4, verbose=0,
                     callbacks=[ld.MetricAverageCallback(), ld.BroadcastCallback()])
    print(f"rank {ld.rank()} of {ld.size()} shard {len(xs)} loss", *hist.history["loss"])
    np.savez(sys.argv[1] + f"-rank{ld.rank()}.npz", *model.get_weights())
"""


@pytest.mark.mpi
@pytest.mark.slow
@needs_mpi
def test_user_keras_script_via_lcls_dl_run(tmp_path, cli):
    script = write_script(tmp_path, "mine.py", USER_SCRIPT)
    proc = cli("run", "--np", "2", str(script), str(tmp_path / "w"), timeout=150,
               env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if " loss " in ln]
    assert len(lines) == 2 and {ln.split("]")[0] for ln in lines} == {"[1,0", "[1,1"}
    assert all("of 2 shard 100 " in ln for ln in lines)
    losses = [[float(v) for v in ln.split(" loss ")[1].split()] for ln in lines]
    assert losses[0] == losses[1]                     # metrics averaged over ranks
    assert losses[0][-1] < losses[0][0]               # it learns
    r0, r1 = np.load(tmp_path / "w-rank0.npz"), np.load(tmp_path / "w-rank1.npz")
    assert all(r0[k].tobytes() == r1[k].tobytes() for k in r0.files)


RESUMED_ROOT_SCRIPT = """
    # rank 0 resumed (its optimizer has state), the others start fresh: Horovod-style resume
    import sys
    import numpy as np
    import lcls_dl.distributed as ld

    ld.init()
    import keras
    keras.utils.set_random_seed(ld.rank())
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    opt = ld.DistributedOptimizer(keras.optimizers.Adam(1e-2))
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    if ld.rank() == 0:
        opt.build(model.trainable_variables)
        opt.iterations.assign(7)
        for v in opt.variables[2:]:
            v.assign(np.full(v.shape, 0.5, "float32"))
    rng = np.random.default_rng(ld.rank())
    x, y = rng.normal(size=(40, 4)).astype("float32"), rng.integers(0, 3, 40)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[ld.BroadcastCallback()])
    got = ld.world().allgather_object(
        ([w.tobytes() for w in model.get_weights()], int(opt.iterations.numpy())))
    if ld.rank() == 0:
        print("ITER", [g[1] for g in got], "SAME", all(g[0] == got[0][0] for g in got))
"""


@pytest.mark.mpi
@needs_mpi
def test_broadcast_callback_gives_a_resumed_roots_optimizer_to_fresh_ranks(tmp_path, cli):
    script = write_script(tmp_path, "resumed.py", RESUMED_ROOT_SCRIPT)
    proc = cli("run", "--np", "2", str(script), timeout=150, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 7 resumed steps + 4 batches of this epoch on every rank, and the same weights
    assert "ITER [11, 11] SAME True" in proc.stdout, proc.stdout[-2000:]


FEW_FRAMES_SCRIPT = """
    import numpy as np
    import lcls_dl.distributed as ld
    from lcls_dl.distributed.partition import partition

    w = ld.init(threads=False)
    partition(np.array([42]), np.array([0]), epoch=0, seed=0, rank=w.rank, size=w.size)
"""


@pytest.mark.mpi
@needs_mpi
def test_fewer_frames_than_ranks_fails_clearly(tmp_path, cli):
    script = write_script(tmp_path, "few.py", FEW_FRAMES_SCRIPT)
    proc = cli("run", "--np", "2", str(script), timeout=90)
    assert proc.returncode != 0
    assert "only 1 frames to share among 2 ranks" in proc.stderr


ONE_RANK_FAILS_SCRIPT = """
    import sys
    import lcls_dl.distributed as ld

    ld.init(threads=False)
    print("read", len(sys.stdin.read()), "characters")   # mpiexec gives no input: EOF
    if ld.rank() == 1:
        if sys.argv[1] == "raise":
            raise RuntimeError("boom on rank 1")
        sys.exit(3)
    ld.barrier()          # rank 0 waits here for a rank that is gone
"""


@pytest.mark.mpi
@needs_mpi
@pytest.mark.parametrize("how,code", [("raise", 1), ("exit", 3)])
def test_one_rank_failing_alone_ends_the_job_with_its_code(tmp_path, cli, how, code):
    script = write_script(tmp_path, "fails.py", ONE_RANK_FAILS_SCRIPT)
    proc = cli("run", "--np", "2", str(script), how, timeout=90)   # a hang fails here
    assert proc.returncode == code, proc.stderr[-3000:]
    assert proc.stdout.count("read 0 characters") == 2
    assert ("RuntimeError: boom on rank 1" in proc.stderr) == (how == "raise")
    assert f"rank 1 exited with code {code} while the others still ran" in proc.stderr


@pytest.mark.mpi
@needs_mpi
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_ends_a_job_that_does_not_checkpoint(tmp_path, sig, code):
    script = write_script(tmp_path, "sleeps.py", """
        import time
        import lcls_dl.distributed as ld

        ld.init(threads=False)
        print("started", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "lcls_dl", "run", "--np", "2", str(script)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        t0 = time.time()
        while proc.stdout.readline().count("started") == 0:
            assert proc.poll() is None and time.time() - t0 < 60
        os.killpg(proc.pid, sig)                 # like Ctrl-C in a terminal, or timeout
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err[-2000:]
    assert ("Ctrl-C: ending the job" in err) == (sig == signal.SIGINT)


def test_a_keypress_passed_on_twice_is_one_ctrl_c(monkeypatch):
    from lcls_dl.distributed import signals
    from lcls_dl.distributed.local_world import LocalWorld

    stop = signals.StopRequest(signals.STOP_SIGNALS + (signal.SIGINT,))
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)      # `timeout` passes the same keypress on
        assert stop.interrupted and not stop.stopping
        monkeypatch.setattr(signals, "REPEAT_AFTER_S", 0.0)
        with pytest.raises(KeyboardInterrupt):   # a real second Ctrl-C ends it at once
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop(LocalWorld())
        os.kill(os.getpid(), signal.SIGINT)      # checkpointing now: ignored
    finally:
        stop.uninstall()


def test_checks_before_long_work(tmp_path, monkeypatch):
    from lcls_dl.active.suggest import check_pool_ranks
    from lcls_dl.atomic import check_writable
    from lcls_dl.dataset import Dataset
    from lcls_dl.distributed.launcher import check_local_ranks

    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file, not a directory"):
        check_writable(tmp_path / "f" / "m")
    check_writable(tmp_path / "new" / "deeper" / "x.csv")      # can be created: fine
    with monkeypatch.context() as m:                          # as on a read-only mount
        m.setattr(os, "access", lambda p, mode: os.fspath(p) != os.fspath(tmp_path))
        with pytest.raises(InputError, match="is not writable"):
            check_writable(tmp_path / "new" / "x.csv")
    ds = Dataset(make_dataset(tmp_path / "ds", n=10, shape=(8, 16), n_q=12, seed=1,
                              unlabeled=5))
    pool = len(ds.unlabeled)
    check_pool_ranks(ds, pool)
    with pytest.raises(InputError, match=f"{pool + 1} ranks for {pool} unlabeled frames"):
        check_pool_ranks(ds, pool + 1)
    check_local_ranks(8, available=8 << 30)
    with pytest.raises(InputError, match="150 ranks on this host need about 75 GB"):
        check_local_ranks(150, available=23 << 30)


@needs_mpi
def test_launch_errors_are_one_line_before_any_rank_starts(tmp_path, cli):
    ds = make_dataset(tmp_path / "ds", n=6, shape=(8, 16), n_q=12, seed=1)
    script = write_script(tmp_path, "ok.py", "print('never run')\n")
    out = tmp_path / "m"
    cases = [
        (["train", ds, "--out", out, "--np", "4", "--val-fraction", "0.5"],
         "training frames (of 6 labeled, after the validation/test split) for 4 ranks"),
        (["train", tmp_path / "nodata", "--out", out, "--np", "2"], "dataset directory not found"),
        (["train", ds, "--out", out, "--np", "2", "--resume"], "nothing to resume"),
        (["train", ds, "--out", out, "--np", "2", "--mpiexec-args", '"oops'],
         "cannot parse --mpiexec-args: no closing quotation"),
        (["run", "--np", "2", "--mpiexec-args", "--map-by 'x", script],
         "cannot parse --mpiexec-args"),
        (["train", ds, "--out", tmp_path / "ok.py" / "m", "--np", "2"],
         "cannot write the model directory"),
        (["run", "--np", "100000", script], "ranks on this host need about"),
        # mpiexec refuses the option: said once, and no restart of a job that never started
        (["train", ds, "--out", out, "--np", "2", "--val-fraction", "0.2", "--max-restarts", "2",
          "--mpiexec-args", "--no-such-mpiexec-option"], "mpiexec could not start the job"),
    ]
    for args, expected in cases:
        proc = cli(*args, timeout=60)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("lcls-dl")]
        assert proc.returncode == 1 and len(errors) == 1, (args, proc.stderr[-2000:])
        assert errors[0].startswith("lcls-dl: error: ") and expected in errors[0], errors
        assert "[1," not in proc.stdout + proc.stderr          # no rank ran
        assert not out.exists()                                # nothing left behind
