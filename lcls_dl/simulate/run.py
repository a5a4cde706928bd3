"""Simulated LCLS runs: per-shot class/temperature model, frame rendering, CXI + truth.csv.

Every frame ``i`` of a run with seed ``s`` is drawn from its own generator
``numpy.random.default_rng([s, i])``, and the run-level detector state (bad pixels, noise
bank) from ``default_rng([s, 1, 0])`` / ``[s, 2, 0]``, so a frame's pixels do not depend on
how the run is split into files or processes.

Examples
--------
>>> from lcls_dl.ingest import geometry
>>> g = geometry.flat((128, 128), 800e-6, 0.1, 9370.0)
>>> p = SimParams(seed=1)
>>> frame, truth = render_frame(g, p, np.random.default_rng([1, 0]))
>>> frame.dtype, truth["label"] in ("water", "ice", "miss")
(dtype('int16'), True)
"""
import csv
import dataclasses
import glob
import io
import json
import math
import os

import numpy as np

from .. import provenance
from ..atomic import atomic_open, atomic_path
from ..errors import InputError
from ..ingest import geometry as geom
from . import physics
from .detector_response import DetectorResponse, sample_photons

CLASSES = ("water", "ice", "miss")
TRUTH_COLUMNS = ("file", "event", "label", "temperature_k", "hit_strength", "n_crystallites",
                 "ice_strength", "s1_q", "s2_q", "ice_type", "n_spots", "max_spot_snr",
                 "air_level", "frame_index")
Q_STEP = 0.002
#: Ice shots redraw crystallite orientations until a spot lands on the detector (at most).
MAX_SPOT_DRAWS = 50


@dataclasses.dataclass
class SimParams:
    """Knobs of a simulated run.

    Parameters
    ----------
    seed : int
    detector : str
        ``cspad`` (1480x1552 slab), ``cspad-modules``, ``jungfrau4m``, ``epix10k2m``.
    distance_mm, energy_ev : float
    temperature : float or None
        None = balanced mode (class mix from ``mix``; ice at 220-224 K; water at 220-224 K
        with probability ``cold_water_fraction``, else 224-270 K, so that the water-ring
        position is not a class proxy). A number = realistic run at that droplet temperature: hits
        at ``hit_rate``, ice share of hits from the cxi25410 table.
    mix : dict
        Class fractions in balanced mode (normalized).
    hit_rate : float
        Fraction of shots that hit a droplet (realistic mode).
    hit_strength : (lo, hi)
        S1 ring peak, photons per pixel (before polarization / solid angle), log-uniform.
    ice_strength : (lo, hi)
        Peak photons of an ice Ih 100 Bragg spot, log-uniform. The default low end (20)
        puts the weakest spots at the edge of detectability: on the strongest water rings
        (~100 photons/pixel, Poisson sigma ~10) a 20-photon spot is ~2 sigma per pixel and
        ~4-5 sigma summed over its pixels (ambiguous ice); on a median ring (~10
        photons/pixel) it is clearly visible. Weaker reflections (|F|^2 < 1) and low
        partiality still make a few percent of ice shots nearly invisible.
    cold_water_fraction : float
        Balanced mode: share of water shots drawn at the ice temperatures (220-224 K).
    min_spot_snr : float
        An ice shot records at least one spot whose peak visibility (``max_spot_snr`` in
        truth.csv) is at least this; crystallite orientations are redrawn (up to
        ``MAX_SPOT_DRAWS`` times) otherwise. 0: at least one spot on the detector.
    crystallites : (lo, hi)
        Crystallites per ice shot, log-uniform integer.
    sd_fraction : float
        Share of ice shots that are stacking-disordered (cubic-like) ice.
    air : (lo, hi)
        Air/gas scatter on axis, photons per pixel, log-uniform (every shot).
    response : DetectorResponse
    """

    seed: int = 0
    detector: str = "cspad"
    distance_mm: float = 139.0
    energy_ev: float = 9370.0
    temperature: object = None
    mix: dict = dataclasses.field(default_factory=lambda: {"water": 0.45, "ice": 0.45,
                                                           "miss": 0.10})
    hit_rate: float = 0.05
    hit_strength: tuple = (1.0, 100.0)
    ice_strength: tuple = (20.0, 3000.0)
    crystallites: tuple = (1, 40)
    sd_fraction: float = 0.3
    cold_water_fraction: float = 0.5
    min_spot_snr: float = 2.0
    air: tuple = (0.005, 0.05)
    response: DetectorResponse = dataclasses.field(default_factory=DetectorResponse)

    def __post_init__(self):
        if isinstance(self.response, dict):
            self.response = DetectorResponse(**self.response)
        mix = {k: float(v) for k, v in dict(self.mix).items()}
        unknown = set(mix) - set(CLASSES)
        if unknown or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise InputError(f"class mix must give non-negative fractions of "
                             f"{', '.join(CLASSES)}, got {self.mix}", "--mix")
        total = sum(mix.values())
        self.mix = {k: mix.get(k, 0.0) / total for k in CLASSES}
        for name in ("hit_strength", "ice_strength", "air", "crystallites"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi):
                raise InputError(f"{name.replace('_', '-')} range must be 0 < lo <= hi, "
                                 f"got {lo},{hi}", f"--{name.replace('_', '-')}")
        if not 0.0 <= self.cold_water_fraction <= 1.0:
            raise InputError(f"cold water fraction must be in [0, 1], got "
                             f"{self.cold_water_fraction}", "cold_water_fraction")
        if not self.min_spot_snr >= 0.0:
            raise InputError(f"min spot snr must be >= 0, got {self.min_spot_snr}",
                             "min_spot_snr")
        if not 0.0 <= self.hit_rate <= 1.0:
            raise InputError(f"hit rate must be in [0, 1], got {self.hit_rate}", "--hit-rate")
        if self.temperature is not None and not 150.0 <= float(self.temperature) <= 320.0:
            raise InputError(f"temperature must be 150-320 K, got {self.temperature}",
                             "--temperature")

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["response"] = self.response.to_dict()
        return d

    def geometry(self):
        """The detector geometry these parameters describe."""
        return geom.by_name(self.detector, self.distance_mm / 1000.0, self.energy_ev)


def _log_uniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _visibility(expected, placed):
    """Expected photons of a spot over the Poisson noise of what lies under it, at the spot's
    brightest pixel: ``peak / sqrt(background + 1)`` (``placed`` from ``render_spot``)."""
    index, patch = placed
    k = np.unravel_index(int(np.argmax(patch)), patch.shape)
    under = float(expected[index][k])
    return float(patch[k]) / math.sqrt(max(under, 0.0) + 1.0)


def draw_shot(params, rng):
    """Draw the generating parameters of one shot (label, temperature, strengths).

    Returns a dict with the truth fields except file/event and ``n_spots``.
    """
    if params.temperature is None:
        label = CLASSES[int(rng.choice(3, p=[params.mix[c] for c in CLASSES]))]
        # ice forms only at 220-224 K; half of the water shots (cold_water_fraction) are
        # drawn there too, so that a cold (low-q) S1 ring does not by itself mean "ice"
        if label == "ice" or rng.random() < params.cold_water_fraction:
            temp = rng.uniform(220.0, 224.0)
        else:
            temp = rng.uniform(224.0, 270.0)
    else:
        temp = float(np.clip(rng.normal(float(params.temperature), 0.5), 150.0, 320.0))
        if rng.random() >= params.hit_rate:
            label = "miss"
        else:
            label = "ice" if rng.random() < physics.ice_share(temp) else "water"
    shot = {"label": label, "temperature_k": round(float(temp), 3), "hit_strength": 0.0,
            "n_crystallites": 0, "ice_strength": 0.0, "ice_type": "", "s1_q": "",
            "s2_q": "", "air_level": _log_uniform(rng, *params.air)}
    if label != "miss":
        shot["hit_strength"] = _log_uniform(rng, *params.hit_strength)
    if label == "ice":
        lo, hi = params.crystallites
        shot["n_crystallites"] = int(min(hi, math.floor(_log_uniform(rng, lo, hi + 1))))
        shot["ice_strength"] = _log_uniform(rng, *params.ice_strength)
        shot["ice_type"] = "sd" if rng.random() < params.sd_fraction else "ih"
    return shot


class Simulator:
    """Renders frames for one geometry and parameter set; precomputes per-pixel maps once.

    Parameters
    ----------
    geometry : DetectorGeometry
    params : SimParams
    """

    def __init__(self, geometry, params):
        self.geometry = geometry
        self.params = params
        q = geometry.q_map()
        self.q_grid = np.arange(0.0, float(np.nanmax(q)) + 2 * Q_STEP, Q_STEP)
        self.q_index = np.clip(np.rint(np.nan_to_num(q) / Q_STEP), 0,
                               len(self.q_grid) - 1).astype(np.intp)
        scale = geometry.polarization() * geometry.solid_angle()
        self.scale = np.nan_to_num(scale).astype(np.float32)
        self.air_grid = physics.air_profile(self.q_grid)
        self.panel_index = [p.index() for p in geometry.panels]
        response = params.response
        self.bad = response.bad_pixels(geometry.frame_shape,
                                       np.random.default_rng([params.seed, 1, 0]))
        n = geometry.n_pixels
        # noise bank: each frame reads a window at a random offset with a random sign
        self._noise = np.random.default_rng([params.seed, 2, 0]).standard_normal(
            2 * n, dtype=np.float32)
        self._noise *= np.float32(response.gain * response.noise_photons)
        hot, _, dead = self.bad
        mask = np.ones(n, bool)
        mask[hot] = False
        mask[dead] = False
        self.mask = mask.reshape(geometry.frame_shape) & geometry.mask

    def geometry_with_mask(self):
        """The geometry with this run's hot/dead pixels masked (as written to CXI)."""
        return self.geometry.with_mask(self.mask)

    def photons(self, rng, shot=None):
        """Draw one shot: ``(photons int32, expected float32, truth dict)``.

        ``expected`` is the expected photon count of every pixel (water + air + ice spots).
        """
        if shot is None:
            shot = draw_shot(self.params, rng)
        if shot["label"] not in CLASSES:
            raise InputError(f"unknown class {shot['label']!r}", "shot")
        if shot["label"] == "miss":
            shot["hit_strength"] = 0.0
        if shot["label"] != "ice":
            shot.update(n_crystallites=0, ice_strength=0.0, ice_type="")
        prof = shot["air_level"] * self.air_grid
        if shot["label"] != "miss":
            water, wp = physics.water_profile(self.q_grid, shot["temperature_k"])
            prof = prof + shot["hit_strength"] * water
            shot["s1_q"] = round(wp["s1_q"], 4)
            shot["s2_q"] = round(wp["s2_q"], 4)
        expected = prof.astype(np.float32)[self.q_index]
        expected *= self.scale
        photons = sample_photons(expected, rng)
        n_spots, best_snr = 0, 0.0
        if shot["label"] == "ice":
            # An ice shot is one whose detector records at least one reflection at a peak
            # visibility >= min_spot_snr: orientations whose spots all miss the detector
            # (gaps, outside the q range) or are far below the noise would be water frames
            # labeled ice, which no image supports (a labeler calls them water). Redraw them.
            for _ in range(MAX_SPOT_DRAWS):
                spots = physics.draw_ice_spots(rng, shot["n_crystallites"],
                                               shot["ice_strength"], kind=shot["ice_type"])
                placed_spots = [physics.render_spot(self.geometry, spot, self.scale)
                                for spot in spots]
                vis = [_visibility(expected, pl) for pl in placed_spots if pl is not None]
                if vis and max(vis) >= self.params.min_spot_snr:
                    break
            for placed in placed_spots:
                if placed is None:
                    continue
                index, patch = placed
                best_snr = max(best_snr, _visibility(expected, placed))
                photons[index] += rng.poisson(patch).astype(np.int32)
                expected[index] += patch.astype(np.float32)
                n_spots += 1
        shot["n_spots"] = n_spots
        shot["max_spot_snr"] = round(best_snr, 3)
        return photons, expected, shot

    def frame(self, rng, shot=None):
        """Draw one shot as stored ADU: ``(frame int16, truth dict)``."""
        photons, _, shot = self.photons(rng, shot)
        n = photons.size
        offset = int(rng.integers(0, n))
        noise = self._noise[offset:offset + n].reshape(photons.shape)
        sign = -1.0 if rng.random() < 0.5 else 1.0
        adu = self.params.response.to_adu(photons, rng, self.panel_index, noise=noise,
                                          bad=self.bad, noise_sign=sign)
        return adu, shot


def _simulator(geometry, params):
    key = ("lcls_dl_simulator", json.dumps(params.to_dict(), sort_keys=True, default=str))
    cache = geometry._cache
    if key not in cache:
        for old in [k for k in cache if isinstance(k, tuple) and k[0] == key[0]]:
            del cache[old]
        cache[key] = Simulator(geometry, params)
    return cache[key]


def render_frame(geometry, params, rng, return_photons=False):
    """Render one shot.

    Parameters
    ----------
    geometry : DetectorGeometry
    params : SimParams
    rng : numpy.random.Generator
        Use ``np.random.default_rng([seed, frame_index])`` to reproduce a run's frame.
    return_photons : bool
        If True return ``(photons, expected, truth)`` (before gain/noise) instead.

    Returns
    -------
    frame : ndarray int16 (ADU), truth : dict
    """
    sim = _simulator(geometry, params)
    if return_photons:
        return sim.photons(rng)
    return sim.frame(rng)


def _file_name(run, index):
    return f"run{run:04d}_{index:03d}.cxi"


def write_cxi(path, sim, frames_iter, n_frames, compression="gzip", events=None):
    """Write ``n_frames`` frames from ``frames_iter`` into one CXI file, atomically."""
    import h5py

    geometry = sim.geometry_with_mask()
    shape = geometry.frame_shape
    comp = {"gzip": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
            "lzf": {"compression": "lzf", "shuffle": True}, "none": {}}[compression]
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f["cxi_version"] = 160
            entry = f.create_group("entry_1")
            det = entry.create_group("instrument_1/detector_1")
            src = entry.create_group("instrument_1/source_1")
            geometry.write_cxi(det, src)
            resp = sim.params.response
            det["lcls_dl_adu_per_photon"] = float(resp.gain)
            det["lcls_dl_pedestal"] = float(resp.pedestal)
            det["lcls_dl_saturation"] = int(resp.saturation)
            data = det.create_dataset("data", shape=(n_frames,) + shape, dtype=np.int16,
                                      chunks=(1,) + shape, **comp)
            data.attrs["units"] = "ADU"
            data.attrs["axes"] = "experiment_identifier:y:x" if len(shape) == 2 else \
                "experiment_identifier:module_identifier:y:x"
            entry.create_group("data_1")
            entry["data_1/data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
            entry["sample_1/name"] = "water droplets (simulated)"
            if events is not None:
                entry["lcls_dl_frame_index"] = np.asarray(events, np.int64)
            truths = []
            for i, (frame, truth) in enumerate(frames_iter):
                data[i] = frame
                truths.append(truth)
    return truths


def check_out_dir(out_dir, overwrite=False):
    """Raise InputError unless ``out_dir`` is absent, empty, or ``overwrite`` is set."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError("output exists and is not a directory", out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise InputError("output directory is not empty (use --overwrite)", out_dir)


def simulate_run(out_dir, n_frames, seed=0, params=None, frames_per_file=100, run=1,
                 overwrite=False, compression="gzip", on_frame=None, command=None,
                 geometry=None):
    """Write a simulated run: ``run0001_000.cxi ...``, ``truth.csv`` and ``run.json``.

    Parameters
    ----------
    out_dir : str
        Output directory; must be empty or absent unless ``overwrite``.
    n_frames : int
    seed : int
    params : SimParams, optional
        Its ``seed`` is replaced by ``seed``.
    frames_per_file : int
    run : int
        Run number in the file names.
    overwrite : bool
    compression : {"gzip", "lzf", "none"}
    on_frame : callable, optional
        Called once per rendered frame (progress bars).
    command : str, optional
        Command line to record in run.json.
    geometry : DetectorGeometry, optional
        Use this geometry instead of ``params.detector`` (e.g. a small flat one in tests).

    Returns
    -------
    dict
        Summary: files, n_frames, class_counts, out_dir.
    """
    n_frames = int(n_frames)
    frames_per_file = int(frames_per_file)
    if n_frames < 1:
        raise InputError(f"--frames must be >= 1, got {n_frames}", "--frames")
    if frames_per_file < 1:
        raise InputError(f"--frames-per-file must be >= 1, got {frames_per_file}",
                         "--frames-per-file")
    if compression not in ("gzip", "lzf", "none"):
        raise InputError(f"unknown compression {compression!r}", "--compression")
    params = dataclasses.replace(params or SimParams(), seed=int(seed))
    out_dir = os.fspath(out_dir)
    check_out_dir(out_dir, overwrite)
    for old in glob.glob(os.path.join(out_dir, "run*_*.cxi")):
        os.unlink(old)
    os.makedirs(out_dir, exist_ok=True)
    if geometry is None:
        geometry = params.geometry()
    sim = Simulator(geometry, params)

    def frames(start, stop, name):
        for index in range(start, stop):
            frame, truth = sim.frame(np.random.default_rng([params.seed, index]))
            truth = {"file": name, "event": index - start, "frame_index": index, **truth}
            if on_frame is not None:
                on_frame()
            yield frame, truth

    rows, files = [], []
    for k, start in enumerate(range(0, n_frames, frames_per_file)):
        stop = min(start + frames_per_file, n_frames)
        name = _file_name(run, k)
        rows += write_cxi(os.path.join(out_dir, name), sim, frames(start, stop, name),
                          stop - start, compression, events=range(start, stop))
        files.append({"path": name, "frames": stop - start,
                      "bytes": os.path.getsize(os.path.join(out_dir, name))})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TRUTH_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    with atomic_open(os.path.join(out_dir, "truth.csv"), "w", encoding="utf-8",
                     newline="") as fh:
        fh.write(buf.getvalue())
    counts = {c: sum(r["label"] == c for r in rows) for c in CLASSES}
    summary = {"kind": "lcls-dl simulated run", "created": provenance.utc_now(),
               "software": provenance.software_versions(), "command": command,
               "seed": params.seed, "n_frames": n_frames, "frames_per_file": frames_per_file,
               "compression": compression, "parameters": params.to_dict(),
               "geometry": sim.geometry_with_mask().to_dict(),
               "frame_shape": list(geometry.frame_shape),
               "dtype": "int16", "adu_per_photon": params.response.gain,
               "pedestal": params.response.pedestal, "class_counts": counts,
               "files": files, "truth": "truth.csv"}
    with atomic_open(os.path.join(out_dir, "run.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2, default=lambda o: o.tolist())
        fh.write("\n")
    return {"out_dir": out_dir, "files": [f["path"] for f in files], "n_frames": n_frames,
            "class_counts": counts}
