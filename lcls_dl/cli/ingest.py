"""``lcls-dl ingest``: detector files -> sharded, labeled, training-ready dataset."""
import json
import os
import shlex
import sys
import time

import click

from ..errors import LclsError
from .common import echo, quiet, verbosity_argv


def _beam_center(ctx, param, value):
    if value is None:
        return None
    try:
        ss, fs = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("give SS,FS in pixels, e.g. 740.5,776.0") from None
    return (ss, fs)


def _classes(ctx, param, value):
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise click.BadParameter("give class names separated by commas")
    return names


def _preprocess(ctx, param, values):
    out = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"{item!r}: use KEY=VALUE (VALUE as JSON, e.g. n_q=128)")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def make_params(overrides):
    """PreprocessParams with ``overrides`` (dict) applied; unknown keys -> LclsError."""
    import dataclasses

    from ..ingest.preprocess import PreprocessParams

    fields = {f.name for f in dataclasses.fields(PreprocessParams)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise LclsError(f"unknown preprocessing parameter {unknown[0]!r} (known: "
                        f"{', '.join(sorted(fields))})", "--preprocess")
    base = PreprocessParams().to_dict()
    base.update(overrides)
    try:
        return PreprocessParams.from_dict(base)
    except (TypeError, ValueError) as exc:
        raise LclsError(f"bad preprocessing parameter: {exc}", "--preprocess") from None


@click.command(context_settings={"max_content_width": 100})
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              metavar="DATASET_DIR", help="Dataset directory to write.")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False), metavar="CSV",
              help="Labels: file,event,label (or event,label for one input file).")
@click.option("--classes", callback=_classes, metavar="A,B,...",
              help="Class list (default: water, ice, miss present, then others sorted).")
@click.option("--np", "n_ranks", type=click.IntRange(1), default=1, show_default=True,
              help="MPI ranks (starts mpiexec; under mpiexec/srun the job's ranks are used).")
@click.option("--hostfile", type=click.Path(dir_okay=False), help="mpiexec hostfile (--np > 1).")
@click.option("--shard-size", type=click.IntRange(1), default=1000, show_default=True,
              help="Frames per shard (unit of work, resume and parallelism).")
@click.option("--chunk-size", type=click.IntRange(1), default=32, show_default=True,
              help="Frames read and preprocessed at a time (bounds memory).")
@click.option("--skip-bad", is_flag=True, help="Skip bad files/frames; list them at the end.")
@click.option("--drop-misses", is_flag=True, help="Keep only frames the hit finder calls hits.")
@click.option("--hit-min-peaks", type=click.IntRange(0), default=8, show_default=True,
              help="--drop-misses: a frame with this many Bragg peaks is a hit.")
@click.option("--hit-min-ring-photons", type=float, default=0.2, show_default=True,
              help="--drop-misses: ... or this many photons/pixel in the water ring (S1).")
@click.option("--force", is_flag=True, help="Rebuild every shard, even over another dataset.")
@click.option("--format", "fmt", type=click.Choice(["cxi", "nexus", "cheetah", "smalldata",
                                                    "plain", "tabular"]),
              help="Force a reader instead of auto-detection.")
@click.option("--dataset", metavar="PATH", help="HDF5 dataset holding the frames.")
@click.option("--label-dataset", metavar="PATH", help="HDF5 dataset holding per-frame labels.")
@click.option("--pixel-size-um", type=float, help="Pixel size (um) for files without geometry.")
@click.option("--distance-mm", type=float, help="Sample-detector distance (mm).")
@click.option("--energy-ev", type=float, help="Photon energy (eV).")
@click.option("--beam-center", callback=_beam_center, metavar="SS,FS",
              help="Beam centre in pixels (default: frame centre).")
@click.option("--poni", type=click.Path(dir_okay=False), help="pyFAI PONI geometry file.")
@click.option("--mask", type=click.Path(dir_okay=False),
              help="Mask file (HDF5 or .npy, nonzero = good pixel).")
@click.option("--preprocess", "preprocess", multiple=True, callback=_preprocess,
              metavar="KEY=VALUE", help="Override a preprocessing parameter (repeatable).")
@click.option("--dark", "dark", type=click.Path(dir_okay=False), default=None,
              help="Per-pixel dark/pedestal frame in ADU (.npy or HDF5 dataset 'dark'/'data'), "
                   "subtracted from every frame; recorded (path + sha256) for predict.")
@click.option("--gain", "gain", type=click.Path(dir_okay=False), default=None,
              help="Per-pixel relative gain (.npy or HDF5 'gain'/'data'): photons = "
                   "(ADU - dark) / (adu_per_photon * gain).")
@click.option("--common-mode", type=click.Choice(["none", "panel-median"]), default=None,
              help="Per-frame baseline correction: panel-median subtracts from each panel "
                   "(ASIC) the median of its pixels below 0.5 photon.  [default: none]")
def ingest(inputs, out_dir, labels_csv, classes, n_ranks, hostfile, shard_size, chunk_size,
           skip_bad, drop_misses, hit_min_peaks, hit_min_ring_photons, force, fmt, dataset,
           label_dataset, pixel_size_um, distance_mm, energy_ev, beam_center, poni, mask,
           preprocess, dark, gain, common_mode):
    """Turn detector files into a sharded, labeled, training-ready dataset.

    INPUT are files, directories or globs (CXI, NeXus, Cheetah, smalldata, plain HDF5,
    CSV/NetCDF tables; auto-detected). Frames without a label are kept unlabeled.
    Re-running resumes (finished shards are kept); a bad input leaves DATASET_DIR as it was.

    \b
    Example:
      lcls-dl ingest run1 --labels run1/truth.csv --out data1
      lcls-dl ingest 'raw/*_master.h5' --out data2 --np 2 --drop-misses
      lcls-dl ingest frames.h5 --dataset /entry/data --pixel-size-um 75 \\
          --distance-mm 120 --energy-ev 9500 --mask mask.npy --out data3
      lcls-dl ingest run2 --dark dark.npy --common-mode panel-median --out data4
    """
    from ..distributed.launcher import comm_world, in_mpi_job, maybe_launch
    from ..ingest import pipeline

    reader_options = dict(format=fmt, dataset=dataset, label_dataset=label_dataset,
                          pixel_size_um=pixel_size_um, distance_mm=distance_mm,
                          energy_ev=energy_ev, beam_center=beam_center, poni=poni, mask=mask)
    if common_mode is not None:  # same as --preprocess common_mode=...
        preprocess = dict(preprocess, common_mode=common_mode)
    for field, path in (("dark_file", dark), ("gain_file", gain)):
        if path is not None:  # absolute: predict finds it from anywhere
            preprocess = dict(preprocess, **{field: os.path.abspath(path)})
    params = make_params(preprocess)
    settings = dict(labels_csv=labels_csv, shard_size=shard_size, skip_bad=skip_bad,
                    drop_misses=drop_misses, force=force, params=params, classes=classes,
                    chunk_size=chunk_size, hit_min_peaks=hit_min_peaks,
                    hit_min_ring_photons=hit_min_ring_photons)
    if n_ranks > 1 and not in_mpi_job():
        argv = verbosity_argv() + pipeline.cli_argv(
            inputs, out_dir, quiet=False, **settings, **reader_options)
        return maybe_launch(argv, n_ranks, hostfile=hostfile)
    comm = comm_world()
    rank = comm.Get_rank() if comm is not None else 0
    command = "lcls-dl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    t0 = time.perf_counter()
    try:
        manifest = pipeline.ingest(inputs, out_dir, np=1, command=command,
                                   show_progress=not quiet(), **settings, **reader_options)
    except LclsError as exc:
        if rank != 0:  # rank 0 reports the error once
            raise click.exceptions.Exit(1) from exc
        raise
    if rank != 0:
        return 0
    elapsed = time.perf_counter() - t0
    _report(manifest, out_dir, elapsed)
    return 0


def _report(manifest, out_dir, elapsed):
    counts = ", ".join(f"{c} {n}" for c, n in manifest["class_counts"].items())
    if manifest.get("_up_to_date"):
        echo(f"{out_dir}: up to date ({manifest['n_frames']} frames in "
             f"{len(manifest['shards'])} shards; use --force to rebuild)")
        return
    rate = sum(i["frames"] for i in manifest["inputs"]) / max(elapsed, 1e-9)
    echo(f"wrote {out_dir}: {manifest['n_frames']} frames in {len(manifest['shards'])} shards "
         f"({counts}) in {elapsed:.1f} s, {rate:.0f} frames/s")
    if manifest["bad"]:
        click.echo(f"skipped {len(manifest['bad'])} bad item(s) (--skip-bad; listed in "
                   f"{os.path.join(out_dir, 'manifest.json')}):", err=True)
        for item in manifest["bad"]:
            click.echo(f"  {item['where']}: {item['what']}", err=True)
