"""``lcls-dl simulate``: write simulated LCLS water/ice runs (CXI files + truth.csv)."""
import sys

import click

from ..errors import InputError
from .common import echo, progress


def _pair(text, name, cast=float):
    try:
        lo, hi = (cast(v) for v in str(text).split(","))
    except ValueError:
        raise click.BadParameter(f"expected LO,HI (two numbers), got {text!r}",
                                 param_hint=name) from None
    return lo, hi


def _mix(text):
    mix = {}
    for part in str(text).split(","):
        key, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            mix[key.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"expected e.g. water=0.45,ice=0.45,miss=0.1, got {text!r}",
                                     param_hint="--mix") from None
    return mix


def _temperature(text):
    if str(text).lower() == "balanced":
        return None
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"expected a temperature in K or 'balanced', got {text!r}",
                                 param_hint="--temperature") from None


@click.command("simulate")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--frames", "-n", type=click.IntRange(min=1), required=True,
              help="Number of frames (shots) to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the run.")
@click.option("--detector", type=click.Choice(["cspad", "cspad-modules", "jungfrau4m",
                                               "epix10k2m"]),
              default="cspad", show_default=True,
              help="cspad = 1480x1552 raw slab; cspad-modules = psana (32, 185, 388).")
@click.option("--distance-mm", type=float, default=139.0, show_default=True,
              help="Sample-detector distance.")
@click.option("--energy-ev", type=float, default=9370.0, show_default=True,
              help="Photon energy.")
@click.option("--temperature", default="balanced", show_default=True,
              help="Droplet temperature in K for a realistic run (hit rate, ice share of "
                   "hits from cxi25410), or 'balanced' for a training mix.")
@click.option("--mix", default="water=0.45,ice=0.45,miss=0.1", show_default=True,
              help="Class fractions in balanced mode.")
@click.option("--hit-rate", type=float, default=0.05, show_default=True,
              help="Fraction of shots that hit a droplet (realistic mode).")
@click.option("--hit-strength", default="1,100", show_default=True,
              help="S1 ring peak photons/pixel range LO,HI (log-uniform).")
@click.option("--ice-strength", default="20,3000", show_default=True,
              help="Peak photons of an ice 100 spot, range LO,HI (log-uniform).")
@click.option("--crystallites", default="1,40", show_default=True,
              help="Crystallites per ice shot, range LO,HI.")
@click.option("--frames-per-file", type=click.IntRange(min=1), default=100,
              show_default=True, help="Frames per CXI file.")
@click.option("--gain", type=float, default=9.8, show_default=True,
              help="ADU per photon (CSPAD 9.8, CSPAD 1.2 ~32).")
@click.option("--pedestal", type=float, default=100.0, show_default=True,
              help="Dark offset in ADU.")
@click.option("--noise", type=float, default=0.15, show_default=True,
              help="Electronic noise, photons rms.")
@click.option("--compression", type=click.Choice(["gzip", "lzf", "none"]), default="gzip",
              show_default=True, help="HDF5 compression of the frames.")
@click.option("--run", "run_number", type=click.IntRange(min=0), default=1,
              show_default=True, help="Run number in the file names (run0001_000.cxi).")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty OUT_DIR.")
def simulate(out_dir, frames, seed, detector, distance_mm, energy_ev, temperature, mix,
             hit_rate, hit_strength, ice_strength, crystallites, frames_per_file, gain,
             pedestal, noise, compression, run_number, overwrite):
    """Write simulated LCLS water/ice detector runs (CXI + truth.csv).

    Frames are CSPAD-like (or Jungfrau/ePix) ADU images of water droplets (two diffuse
    rings, S1 moving with temperature), ice (Bragg spots of a few crystallites on the water
    ring) and misses, with Poisson statistics, gain, pedestal, common mode, noise and bad
    pixels. Each frame depends only on the seed and its index.

    \b
    Example:
      lcls-dl simulate run1 --frames 200 --seed 7
      lcls-dl simulate cold --frames 2000 --temperature 221 --hit-rate 0.05
      lcls-dl simulate small --frames 50 --detector epix10k2m --mix water=1,ice=1,miss=0
    """
    from ..simulate import DetectorResponse, SimParams, simulate_run
    from ..simulate.run import check_out_dir

    check_out_dir(out_dir, overwrite)

    if distance_mm <= 0 or energy_ev <= 0:
        raise InputError("distance and energy must be positive",
                         "--distance-mm/--energy-ev")
    if gain <= 0:
        raise InputError(f"gain must be positive, got {gain}", "--gain")
    lo_c, hi_c = _pair(crystallites, "--crystallites", int)
    params = SimParams(seed=seed, detector=detector, distance_mm=distance_mm,
                       energy_ev=energy_ev, temperature=_temperature(temperature),
                       mix=_mix(mix), hit_rate=hit_rate,
                       hit_strength=_pair(hit_strength, "--hit-strength"),
                       ice_strength=_pair(ice_strength, "--ice-strength"),
                       crystallites=(lo_c, hi_c),
                       response=DetectorResponse(gain=gain, pedestal=pedestal,
                                                 noise_photons=noise))
    bar = progress(total=frames, desc="simulate")
    try:
        summary = simulate_run(out_dir, frames, seed=seed, params=params,
                               frames_per_file=frames_per_file, run=run_number,
                               overwrite=overwrite, compression=compression,
                               on_frame=lambda: bar.update(1),
                               command=" ".join(["lcls-dl"] + sys.argv[1:]))
    finally:
        bar.close()
    counts = ", ".join(f"{k} {v}" for k, v in summary["class_counts"].items())
    echo(f"wrote {summary['n_frames']} frames in {len(summary['files'])} CXI files "
         f"to {out_dir} ({counts}); truth in {out_dir}/truth.csv")
