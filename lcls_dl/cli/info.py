"""``lcls-dl info``: summarize a dataset directory or a model directory."""
import json
import os

import click


def dataset_summary(path):
    """A dict summarizing a dataset directory (manifest + current labels)."""
    from ..dataset import Dataset

    ds = Dataset(path)
    m = ds.manifest
    geom = m.get("geometry")
    summary = {
        "kind": "dataset", "path": os.fspath(path), "created": m.get("created"),
        "lcls_dl": m.get("software", {}).get("lcls_dl"), "command": m.get("command"),
        "frames": len(ds), "classes": ds.classes,
        "class_counts": ds.class_counts(),
        "class_counts_at_ingest": m.get("class_counts"),
        "shards": len(m.get("shards", [])),
        "bytes": int(sum(s.get("bytes", 0) for s in m.get("shards", []))),
        "inputs": len(m.get("inputs", [])),
        "input_frames": int(sum(i.get("frames", 0) for i in m.get("inputs", []))),
        "readers": sorted({i.get("reader") for i in m.get("inputs", [])}),
        "bad": len(m.get("bad", [])),
        "shapes": {k: list(v) for k, v in ds.shapes().items()} if len(ds) else None,
        "scalar_names": ds.scalar_names,
        "parameters": {k: v for k, v in m.get("parameters", {}).items()},
        "preprocessing": {k: v for k, v in m.get("preprocessing", {}).items()
                          if k not in ("q_edges", "scalar_names")},
        "checksum": ds.checksum,
    }
    edges = m.get("preprocessing", {}).get("q_edges")
    if edges:
        summary["q_bins"] = [len(edges) - 1, float(edges[0]), float(edges[-1])]
    if geom:
        from ..ingest.geometry import DetectorGeometry

        g = DetectorGeometry.from_dict(geom)
        summary["geometry"] = {"name": g.name, "frame_shape": list(g.frame_shape),
                               "panels": len(g.panels), "distance_m": g.distance,
                               "energy_ev": g.energy_ev,
                               "wavelength_angstrom": round(g.wavelength, 5),
                               "pixels": g.n_pixels, "good_pixels": int(g.mask.sum())}
    else:
        summary["geometry"] = None
    ds.close()
    return summary


def model_summary(path):
    """A dict with a model directory's metadata (``model.json``)."""
    with open(os.path.join(path, "model.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    return {"kind": "model", "path": os.fspath(path), **meta}


def _fmt(value, width=100):
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= width else text[:width - 3] + "..."


def _print(summary):
    click.echo(f"{summary['kind']}: {summary['path']}")
    if summary["kind"] == "dataset":
        s = summary
        click.echo(f"  created     {s['created']} by lcls-dl {s['lcls_dl']}")
        if s.get("command"):
            click.echo(f"  command     {_fmt(s['command'])}")
        click.echo(f"  frames      {s['frames']} (of {s['input_frames']} input frames in "
                   f"{s['inputs']} files; readers: {', '.join(map(str, s['readers']))})")
        click.echo("  classes     " + ", ".join(f"{c} {n}" for c, n in s["class_counts"].items()))
        click.echo(f"  shards      {s['shards']} ({s['bytes'] / 1e6:.1f} MB)")
        if s["shapes"]:
            click.echo("  arrays      " + ", ".join(f"{k} {tuple(v)}"
                                                   for k, v in s["shapes"].items()))
        if s["scalar_names"]:
            click.echo(f"  scalars     {', '.join(s['scalar_names'])}")
        if s.get("q_bins"):
            n, lo, hi = s["q_bins"]
            click.echo(f"  q bins      {n} from {lo:.3f} to {hi:.3f} 1/A")
        g = s["geometry"]
        if g:
            click.echo(f"  geometry    {g['name']} {tuple(g['frame_shape'])}, {g['panels']} "
                       f"panels, {g['distance_m'] * 1e3:.1f} mm, {g['energy_ev']:.1f} eV "
                       f"({g['wavelength_angstrom']:.4f} A), {g['good_pixels']}/{g['pixels']} "
                       "good pixels")
        else:
            click.echo("  geometry    none (tabular inputs)")
        click.echo(f"  bad         {s['bad']} skipped item(s)")
        for key, value in s["preprocessing"].items():
            click.echo(f"  preprocess  {key} = {_fmt(value, 80)}")
        for key, value in s["parameters"].items():
            click.echo(f"  parameter   {key} = {_fmt(value, 80)}")
        click.echo(f"  checksum    {s['checksum']}")
    else:
        for key, value in summary.items():
            if key not in ("kind", "path"):
                click.echo(f"  {key:<18} {_fmt(value)}")


@click.command(context_settings={"max_content_width": 100})
@click.argument("path", type=click.Path(), metavar="DATASET_DIR|MODEL_DIR")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(path, as_json):
    """Summarize a dataset or a model directory.

    A dataset: frames, classes (with labels added since ingest), shards, geometry,
    preprocessing and ingest parameters. A model directory (with model.json): its metadata.

    \b
    Example:
      lcls-dl info data1
      lcls-dl info model1 --json
    """
    from ..errors import InputError

    if os.path.isfile(os.path.join(path, "model.json")):
        summary = model_summary(path)
    elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, "manifest.json")):
        raise InputError("neither a dataset (manifest.json) nor a model directory (model.json)",
                         path)
    else:
        summary = dataset_summary(path)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        _print(summary)
    return 0
