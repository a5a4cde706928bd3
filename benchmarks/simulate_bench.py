"""Simulator throughput on CSPAD frames (1480x1552 slab, 2.3 Mpixel), one core.

Rows of the table, all measured in this run on the same frame size:

* reference ``numpy pass``: one ``np.multiply(a, b, out=c)`` over a float32 frame;
* reference ``numpy Poisson``: ``Generator.poisson`` over a frame of expected counts
  (the textbook way to add photon noise; mean 3 photons/pixel);
* ``photons``: ``Simulator.photons`` (shot draw, water/air expected intensity, Poisson
  counts, ice Bragg spots) with the balanced default class mix;
* ``frame``: ``Simulator.frame`` (photons + gain, pedestal, common mode, noise, bad
  pixels -> int16 ADU), i.e. ``render_frame``;
* ``frame + CXI write``: ``frame`` and writing it to a chunked HDF5 dataset (gzip level 1 +
  shuffle, the default of ``lcls-dl simulate``; lzf with ``--compression lzf``).

Each row: one warm-up, then ``--frames`` timed calls (frames i = 0..N-1 of seed 0); frames/s
from wall-clock and from process CPU time (less sensitive to other load on a shared machine),
and the ratio to the ``numpy Poisson`` reference.

Run::

    python benchmarks/simulate_bench.py --frames 30
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def _time(fn, n):
    fn(10 ** 6)   # warm-up (an index outside the timed ones)
    wall, cpu = [], []
    for i in range(n):
        w0, c0 = time.perf_counter(), time.process_time()
        fn(i)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return n / sum(wall), n / max(sum(cpu), 1e-9), float(np.median(wall))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=30, help="timed frames per row")
    ap.add_argument("--compression", choices=["gzip", "lzf"], default="gzip")
    args = ap.parse_args(argv)

    import h5py

    from lcls_dl.simulate import SimParams, Simulator

    params = SimParams(seed=0)
    t0 = time.perf_counter()
    geometry = params.geometry()
    sim = Simulator(geometry, params)
    sim.frame(np.random.default_rng([0, 10 ** 6]))   # builds the Poisson tables too
    setup = time.perf_counter() - t0
    shape = geometry.frame_shape
    rng = np.random.default_rng(1)
    a = rng.random(shape, dtype=np.float32)
    b = rng.random(shape, dtype=np.float32)
    c = np.empty_like(a)
    lam = np.full(shape, 3.0)

    rows = []
    rows.append(("numpy pass (reference)", *_time(lambda i: np.multiply(a, b, out=c),
                                                    args.frames * 4)))
    rows.append(("numpy Poisson (reference)", *_time(lambda i: rng.poisson(lam),
                                                       args.frames)))
    rows.append(("photons", *_time(lambda i: sim.photons(np.random.default_rng([0, i])),
                                   args.frames)))
    rows.append(("frame (render_frame)",
                 *_time(lambda i: sim.frame(np.random.default_rng([0, i])), args.frames)))
    comp = ({"compression": "gzip", "compression_opts": 1, "shuffle": True}
            if args.compression == "gzip" else {"compression": "lzf", "shuffle": True})
    with tempfile.TemporaryDirectory() as tmp:
        with h5py.File(os.path.join(tmp, "bench.cxi"), "w") as f:
            data = f.create_dataset("data", shape=(args.frames + 1,) + shape, dtype=np.int16,
                                    chunks=(1,) + shape, **comp)

            def write(i):
                data[min(i, args.frames)] = sim.frame(np.random.default_rng([0, i]))[0]
            rows.append((f"frame + CXI write ({args.compression})", *_time(write, args.frames)))
    ref = rows[1][1]
    print(f"# simulate_bench: {shape[0]}x{shape[1]} CSPAD slab, {args.frames} frames/row, "
          f"1 thread, {platform.processor() or platform.machine()}, "
          f"numpy {np.__version__}; setup (geometry maps, Poisson tables) {setup:.2f} s")
    print(f"{'what':32s} {'frames/s (wall)':>16s} {'frames/s (cpu)':>15s} "
          f"{'median ms':>10s} {'x numpy Poisson':>16s}")
    for name, fps, cps, med in rows:
        print(f"{name:32s} {fps:16.1f} {cps:15.1f} {med * 1e3:10.1f} {fps / ref:16.2f}")


if __name__ == "__main__":
    main()
