"""Ingest throughput on CSPAD-size (2.3 Mpixel) frames, one core, ratios from the same run.

Parts (``--parts``, comma separated):

a. ``bench_profile``: frames/s of the radial profile alone: lcls-dl's fused C pass
   (``FramePreprocessor.profile``) vs pyFAI ``integrate1d`` (histogram and CSR methods, no
   pixel splitting, no solid-angle/polarization correction), a scipy.sparse CSR
   matrix-vector product and ``numpy.bincount``, all on the same flat 1516x1516 geometry
   (109.92 um pixels, 139 mm, 9.37 keV) and the same uint16 frames.
b. ``bench_preprocess``: frames/s of the full per-frame preprocessing (profile, polar image,
   peak finding, scalars) on the CSPAD slab geometry (1480x1552, 64 ASIC panels), C kernels
   and numpy reference; with the optional per-panel common mode and with a per-pixel
   dark frame (integer ADU; C kernels).
c. ``bench_ingest``: end-to-end ``lcls-dl ingest`` of a simulated CSPAD run (uncompressed
   CXI, ``--e2e-frames`` frames, default 1920; ``--e2e-workdir DIR`` keeps the 8.8 GB run for
   the next time) with ``--np 1`` and ``--np 2``; the ratio is np=2 over np=1,
   wall clock of the whole command (interpreter and mpiexec start-up included) and, in the
   note, the in-job rate the command reports (see ``ingest_e2e_bench.py``).

Everything runs in this process on one thread (``OMP_NUM_THREADS=1`` unless set). Each
method gets a warm-up call, then the methods of a part run in 5 interleaved rounds (so they
share whatever load the machine has) over 8 different frames, ``--frames`` frames in all for
lcls-dl (fewer for slow references). The table shows the median over rounds of frames/s
from wall-clock and from process CPU time (less sensitive to other processes on a shared
machine), and the ratios of both to the part's reference (pyFAI histogram for a, the
120 Hz LCLS repetition rate for b).

Run::

    python benchmarks/ingest_bench.py --frames 50 --parts a,b,c --e2e-workdir /tmp/ingest-e2e
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/pyFAI start their thread pools

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from lcls_dl.ingest.kernels import get_kernels  # noqa: E402
from lcls_dl.ingest.preprocess import FramePreprocessor, PreprocessParams  # noqa: E402

PIXEL = 109.92e-6
DISTANCE = 0.139
ENERGY_EV = 9370.0
WAVELENGTH = 12398.4198 / ENERGY_EV  # angstrom
N_DISTINCT = 8


def flat_geometry(n=1516):
    """q (1/A), phi (rad) of an n x n flat detector (beam at the centre) and its pyFAI setup."""
    c = (n - 1) / 2
    ss, fs = np.indices((n, n), dtype=np.float64)
    y, x = (ss - c) * PIXEL, (fs - c) * PIXEL
    two_theta = np.arctan2(np.hypot(x, y), DISTANCE)
    q = 4 * np.pi * np.sin(two_theta / 2) / WAVELENGTH
    return q, np.arctan2(y, x), {"center": (c, c), "shape": (n, n)}


def cspad_geometry():
    """q, phi, mask, panel ids of the CSPAD slab (falls back to the flat detector)."""
    try:
        from lcls_dl.ingest.geometry import cspad

        g = cspad(distance=DISTANCE, energy_ev=ENERGY_EV, layout="slab")
        panel_ids = np.zeros(g.frame_shape, np.int32)
        for i, p in enumerate(g.panels):
            panel_ids[p.ss0:p.ss1, p.fs0:p.fs1] = i
        return g.q_map(), g.phi_map(), g.mask, panel_ids, "cspad slab 1480x1552"
    except Exception as exc:  # geometry module unavailable: same pixel count, flat
        q, phi, _ = flat_geometry()
        return q, phi, None, None, f"flat 1516x1516 (cspad geometry unavailable: {exc})"


def synthetic_frames(q, rng, n=N_DISTINCT):
    """uint16 photon frames: water rings of varying strength, Poisson noise, some ice spots."""
    rings = np.exp(-0.5 * ((q - 1.9) / 0.25) ** 2) + 0.7 * np.exp(-0.5 * ((q - 2.95) / 0.2) ** 2)
    frames = []
    for i in range(n):
        lam = rings * (2.0 + 8.0 * i / max(n - 1, 1)) + 0.05
        f = rng.poisson(lam).astype(np.uint16).reshape(-1)
        for _ in range(40 * (i % 3)):  # 0, 40 or 80 spots of 3x3 pixels
            k = rng.integers(0, f.size - 3 * q.shape[-1] - 3)
            for r in range(3):
                f[k + r * q.shape[-1]: k + r * q.shape[-1] + 3] += np.uint16(rng.integers(50, 500))
        frames.append(f.reshape(q.shape))
    return frames


def _time_interleaved(methods, n_frames, rounds=5):
    """Time several methods in interleaved rounds so that they share the machine's load.

    ``methods``: list of (fn, frames, share) with ``share`` the fraction of ``n_frames`` that
    method processes (slow references get fewer). Each method first gets a warm-up call
    (builds pyFAI's CSR matrix, page-faults workspaces). Returns per method the median over
    rounds of (wall frames/s, CPU frames/s) and the frames timed.
    """
    for fn, frames, _ in methods:
        fn(frames[0])
    samples = [[] for _ in methods]
    done = [0] * len(methods)
    for r in range(rounds):
        for k, (fn, frames, share) in enumerate(methods):
            n = max(1, round(n_frames * share / rounds))
            w0, c0 = time.perf_counter(), time.process_time()
            for i in range(n):
                fn(frames[(r * n + i) % len(frames)])
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            samples[k].append((n / wall, n / max(cpu, 1e-9)))
            done[k] += n
    out = []
    for k, smp in enumerate(samples):
        a = np.array(smp)
        out.append((float(np.median(a[:, 0])), float(np.median(a[:, 1])), done[k]))
    return out


def bench_profile(n_frames=50, seed=0):
    """Part (a): radial profile frames/s; returns a list of result rows (dicts)."""
    params = PreprocessParams()  # q 0.5-3.5 1/A, 128 bins
    q, phi, info = flat_geometry()
    frames = synthetic_frames(q, np.random.default_rng(seed))
    rows = []
    pre = FramePreprocessor(q, phi, None, params)
    ref = FramePreprocessor(q, phi, None, params, kernels="numpy")

    # scipy CSR matrix (n_q x n_pixels), frame pre-converted to float32 (its best case)
    from scipy import sparse

    pb = pre.profile_bin.reshape(-1)
    used = np.flatnonzero(pb >= 0)
    mat = sparse.csr_matrix((np.ones(used.size, np.float32), (pb[used], used)),
                            shape=(params.n_q, pb.size))
    counts = np.maximum(np.bincount(pb[used], minlength=params.n_q), 1).astype(np.float32)
    frames32 = [f.reshape(-1).astype(np.float32) for f in frames]

    def bincount_profile(f):
        flat = f.reshape(-1)
        return np.bincount(pb[used], weights=flat[used], minlength=params.n_q) / counts

    methods = [
        (f"lcls-dl profile ({pre.kernels.name} kernels)", pre.profile, frames, 1.0, ""),
        ("lcls-dl profile (numpy reference)", ref.profile, frames, 0.1, ""),
        ("scipy.sparse CSR matvec (float32 in)", lambda f: (mat @ f) / counts, frames32, 0.5, ""),
        ("numpy bincount", bincount_profile, frames, 0.2, ""),
        ("one memory pass (frame.sum())", lambda f: f.sum(), frames, 1.0, "reference floor"),
    ]
    try:
        from pyFAI.detectors import Detector
        from pyFAI.integrator.azimuthal import AzimuthalIntegrator
    except ImportError as exc:
        rows.append({"part": "a", "method": "pyFAI", "fps": float("nan"), "fps_cpu": float("nan"),
                     "frames": 0, "note": f"not installed ({exc})"})
    else:
        c = info["center"]
        ai = AzimuthalIntegrator(dist=DISTANCE, poni1=(c[0] + 0.5) * PIXEL, poni2=(c[1] + 0.5) * PIXEL,
                                 wavelength=WAVELENGTH * 1e-10,
                                 detector=Detector(PIXEL, PIXEL, max_shape=info["shape"]))
        for method in ("histogram", "csr"):
            def fai(f, method=method):
                return ai.integrate1d(f, params.n_q, unit="q_A^-1",
                                      radial_range=(params.q_min, params.q_max),
                                      correctSolidAngle=False, polarization_factor=None,
                                      method=("no", method, "cython"))
            res = fai(frames[0])
            mine = pre.profile(frames[0])
            ok = res.intensity != 0
            err = np.linalg.norm(mine[ok] - res.intensity[ok]) / np.linalg.norm(res.intensity[ok])
            methods.append((f"pyFAI integrate1d ({method})", fai, frames, 0.25,
                            f"rel. L2 to lcls-dl profile {err:.1e}"))
    timed = _time_interleaved([(fn, fr, share) for _, fn, fr, share, _ in methods], n_frames)
    for (name, _, _, _, note), (wall, cpu, n) in zip(methods, timed):
        rows.append({"part": "a", "method": name, "fps": wall, "fps_cpu": cpu, "frames": n,
                     "note": note})
    base = [r for r in rows if r["method"] == "pyFAI integrate1d (histogram)"]
    for r in rows:
        ok = base and base[0]["fps"] > 0
        r["ratio"] = r["fps"] / base[0]["fps"] if ok else float("nan")
        r["ratio_cpu"] = r["fps_cpu"] / base[0]["fps_cpu"] if ok else float("nan")
        r["ref"] = "pyFAI histogram"
    return rows


def bench_preprocess(n_frames=50, seed=0):
    """Part (b): full per-frame preprocessing frames/s on one core; list of result rows."""
    q, phi, mask, panel_ids, name = cspad_geometry()
    frames = synthetic_frames(q, np.random.default_rng(seed))
    params = PreprocessParams()
    rows, methods = [], []
    cm = PreprocessParams(common_mode="panel-median")
    # a per-pixel dark frame (integer ADU, ~1500 +- 50, as a pedestal calibration gives
    # after rounding) under the same photons: the frames every real CSPAD ingest sees
    dark = np.round(np.random.default_rng(seed + 1).normal(1500.0, 50.0, q.shape))
    dark_frames = [(f + dark).astype(np.uint16) for f in frames]
    for kern, share, p, d in (("auto", 1.0, params, None), ("numpy", 0.1, params, None),
                              ("auto", 0.5, cm, None), ("auto", 0.5, params, dark)):
        t0 = time.perf_counter()
        pre = FramePreprocessor(q, phi, mask, p, panel_ids=panel_ids, kernels=kern, dark=d)
        setup = time.perf_counter() - t0
        fr = frames if d is None else dark_frames
        peaks = [int(pre(f)["scalars"][0]) for f in fr[:3]]
        methods.append((pre, fr, share, f"{name}; setup {setup:.1f} s; peaks in 3 frames {peaks}"))
    timed = _time_interleaved([(pre, fr, share) for pre, fr, share, _ in methods], n_frames)
    for (pre, _, _, note), (wall, cpu, n) in zip(methods, timed):
        method = f"full preprocessing ({pre.kernels.name} kernels)"
        if pre.params.common_mode != "none":
            method = f"full preprocessing + common mode ({pre.kernels.name})"
        elif np.ndim(pre.offset):
            method = f"full preprocessing + dark frame ({pre.kernels.name})"
        rows.append({"part": "b", "method": method,
                     "fps": wall, "fps_cpu": cpu, "frames": n, "ratio": wall / 120.0,
                     "ratio_cpu": cpu / 120.0, "ref": "120 Hz", "note": note})
    return rows


#: frames of part c's run: 16 s of beam at 120 Hz, 8.8 GB of uncompressed CSPAD frames (at
#: 480 frames, ~0.5 s of per-rank set-up and start-up weighed on a 3 s job)
E2E_FRAMES = 1920


def bench_ingest(n_frames=None, seed=0, e2e_frames=E2E_FRAMES, e2e_workdir=None):
    """Part c: rows for ``lcls-dl ingest --np 1`` and ``--np 2`` on a simulated CSPAD run."""
    from ingest_e2e_bench import bench_ingest_e2e  # a sibling script in benchmarks/

    res = bench_ingest_e2e(e2e_frames, nps=(1, 2), workdir=e2e_workdir, seed=seed, repeat=2)
    rows = []
    base = res["results"][0]
    for r in res["results"]:
        rows.append({"part": "c", "method": f"lcls-dl ingest --np {r['np']} ({res['frames']} frames)",
                     "fps": r["frames_per_s"], "fps_cpu": float("nan"),
                     "ratio": r["frames_per_s"] / base["frames_per_s"], "ref": "--np 1",
                     "note": f"in-job {r['job_frames_per_s']:.1f} f/s "
                             f"({r['job_frames_per_s'] / base['job_frames_per_s']:.2f}x)"})
    return rows


#: part letter -> function(n_frames, seed) returning rows
PARTS = {"a": bench_profile, "b": bench_preprocess, "c": bench_ingest}


def format_table(rows):
    """Plain-text table of benchmark rows."""
    head = (f"{'part':<4} {'method':<42} {'frames/s':>9} {'cpu f/s':>9} {'ratio':>8} "
            f"{'cpu ratio':>9}  {'vs':<16} note")
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for r in rows:
        lines.append(f"{r['part']:<4} {r['method']:<42} {r['fps']:>9.1f} {r['fps_cpu']:>9.1f} "
                     f"{r.get('ratio', nan):>7.2f}x {r.get('ratio_cpu', nan):>8.2f}x  "
                     f"{r.get('ref', ''):<16} {r.get('note', '')}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=50, help="timed frames per method (default 50)")
    ap.add_argument("--parts", default="a,b,c", help="comma-separated parts to run (a,b,c)")
    ap.add_argument("--e2e-frames", type=int, default=E2E_FRAMES,
                    help=f"frames of the simulated run for part c (default {E2E_FRAMES})")
    ap.add_argument("--e2e-workdir", help="keep part c's simulated run here and reuse it "
                    "(default: a temporary directory)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown or unavailable part(s) {','.join(unknown)}; available: {','.join(PARTS)}")
    kern = get_kernels()
    print(f"# ingest_bench: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.2f}, kernels={kern.name}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, frames={args.frames}")
    rows = []
    for p in parts:
        extra = {"e2e_frames": args.e2e_frames, "e2e_workdir": args.e2e_workdir} \
            if p == "c" else {}
        rows += PARTS[p](args.frames, args.seed, **extra)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
