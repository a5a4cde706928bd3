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
        "bad_items": list(m.get("bad", [])),
        "input_files": [{k: i.get(k) for k in ("path", "frames", "reader")}
                        for i in m.get("inputs", [])],
        "software": m.get("software", {}),
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
    from ..errors import InputError

    mpath = os.path.join(path, "model.json")
    try:
        with open(mpath, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable model.json: {' '.join(str(exc).split())}",
                         mpath) from None
    if not isinstance(meta, dict):
        raise InputError("model.json is not a JSON object", mpath)
    return {**meta, "kind": "model", "path": os.fspath(path)}


#: how many inputs / bad items ``info`` lists before "... and N more"
LIST_MAX = 10


def _fmt(value, width=100):
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= width else text[:width - 3] + "..."


def _counts(counts):
    return ", ".join(f"{c} {n}" for c, n in (counts or {}).items())


def _versions(software):
    return ", ".join(f"{k} {v}" for k, v in (software or {}).items()
                     if v is not None and k != "platform")


def _listing(label, items, line):
    """Echo up to LIST_MAX ``line(item)`` rows under ``label``."""
    for k, item in enumerate(items[:LIST_MAX]):
        click.echo(f"  {label if k == 0 else '':<11} {line(item)}")
    if len(items) > LIST_MAX:
        click.echo(f"  {'':<11} ... and {len(items) - LIST_MAX} more")


def _geometry_line(g):
    """One line for a geometry dict (``DetectorGeometry.to_dict()``) or a summary of one."""
    from ..ingest.geometry import DetectorGeometry

    if "panels" in g and isinstance(g["panels"], list):
        d = DetectorGeometry.from_dict(g)
        g = {"name": d.name, "frame_shape": list(d.frame_shape), "panels": len(d.panels),
             "distance_m": d.distance, "energy_ev": d.energy_ev,
             "wavelength_angstrom": d.wavelength, "pixels": d.n_pixels,
             "good_pixels": int(d.mask.sum())}
    return (f"{g['name']} {tuple(g['frame_shape'])}, {g['panels']} panel(s), "
            f"{g['distance_m'] * 1e3:.1f} mm, {g['energy_ev']:.1f} eV "
            f"({g['wavelength_angstrom']:.4f} A), {g['good_pixels']}/{g['pixels']} good pixels")


def _print_preprocessing(pre):
    for key, value in (pre or {}).items():
        if key not in ("q_edges", "scalar_names"):
            click.echo(f"  preprocess  {key} = {_fmt(value, 80)}")


def _print(summary):
    click.echo(f"{summary['kind']}: {summary['path']}")
    if summary["kind"] == "dataset":
        _print_dataset(summary)
    else:
        _print_model(summary)


def _print_dataset(s):
    click.echo(f"  created     {s['created']} by lcls-dl {s['lcls_dl']}")
    if s.get("command"):
        click.echo(f"  command     {s['command']}")
    click.echo(f"  frames      {s['frames']} (of {s['input_frames']} input frames in "
               f"{s['inputs']} files; readers: {', '.join(map(str, s['readers']))})")
    _listing("inputs", s.get("input_files", []),
             lambda i: f"{i['path']}: {i['frames']} frames ({i['reader']})")
    click.echo("  classes     " + _counts(s["class_counts"]))
    at_ingest = s.get("class_counts_at_ingest")
    if at_ingest and {k: v for k, v in at_ingest.items() if v} != \
            {k: v for k, v in s["class_counts"].items() if v}:
        click.echo("  at ingest   " + _counts(at_ingest))
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
    click.echo("  geometry    " + (_geometry_line(g) if g else "none (tabular inputs)"))
    click.echo(f"  bad         {s['bad']} skipped item(s)")
    _listing("", s.get("bad_items", []), lambda b: f"{b.get('where')}: {b.get('what')}")
    _print_preprocessing(s["preprocessing"])
    for key, value in s["parameters"].items():
        click.echo(f"  parameter   {key} = {_fmt(value, 80)}")
    if s.get("software"):
        click.echo(f"  software    {_versions(s['software'])}")
    click.echo(f"  checksum    {s['checksum']}")


def _print_model(m):
    """Known model.json keys as readable lines, then any other key as JSON."""
    shown = {"kind", "path", "schema_version", "created", "software", "command", "model_kind",
             "classes", "inputs", "dataset", "split", "training", "metrics", "geometry",
             "preprocessing", "q_edges", "scalar_names", "temperature"}
    sw = m.get("software") or {}
    if m.get("created"):
        click.echo(f"  created     {m['created']} by lcls-dl {sw.get('lcls_dl')}")
    if m.get("command"):
        click.echo(f"  command     {m['command']}")
    training = m.get("training") or {}
    if m.get("model_kind"):
        params = training.get("params")
        click.echo(f"  model       {m['model_kind']}"
                   + (f", {params} parameters" if params is not None else ""))
    if m.get("classes"):
        click.echo(f"  classes     {', '.join(m['classes'])}")
    if m.get("inputs"):
        click.echo("  inputs      " + ", ".join(f"{k} {tuple(v)}" for k, v in m["inputs"].items()))
    if m.get("scalar_names"):
        click.echo(f"  scalars     {', '.join(m['scalar_names'])}")
    ds = m.get("dataset") or {}
    if ds:
        click.echo(f"  dataset     {ds.get('path')}: {ds.get('n_frames')} frames "
                   f"({_counts(ds.get('class_counts'))}), manifest "
                   f"{str(ds.get('manifest_checksum'))[:16]}")
    split = m.get("split") or {}
    if split.get("counts"):
        click.echo(f"  split       {_counts(split['counts'])} (seed {split.get('seed')}, "
                   f"val {split.get('val_fraction')}, test {split.get('test_fraction')})")
    if training:
        click.echo(f"  training    {training.get('epochs_run')} epochs (best "
                   f"{training.get('best_epoch')}, val loss {training.get('best_val_loss')}"
                   f"{', stopped early' if training.get('stopped_early') else ''}), "
                   f"{training.get('world_size')} rank(s), batch "
                   f"{training.get('global_batch_size')}, {training.get('train_seconds')} s, "
                   f"{training.get('images_per_second')} images/s")
        if training.get("options"):
            click.echo(f"  options     {_fmt(training['options'], 200)}")
    if m.get("temperature") is not None:
        click.echo(f"  temperature {m['temperature']}")
    for split_name, report in (m.get("metrics") or {}).items():
        if isinstance(report, dict):
            click.echo(f"  {split_name + ' metrics':<11} n {report.get('n')}, accuracy "
                       f"{_num(report.get('accuracy'))}, macro F1 {_num(report.get('macro_f1'))}"
                       f", log loss {_num(report.get('log_loss'))}, ECE {_num(report.get('ece'))}")
    if m.get("geometry"):
        click.echo(f"  geometry    {_geometry_line(m['geometry'])}")
    _print_preprocessing(m.get("preprocessing"))
    for key, value in m.items():
        if key not in shown:
            click.echo(f"  {key:<11} {_fmt(value)}")
    if sw:
        click.echo(f"  software    {_versions(sw)}")


def _num(value):
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


@click.command(context_settings={"max_content_width": 100})
@click.argument("path", type=click.Path(), metavar="DATASET_DIR|MODEL_DIR")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(path, as_json):
    """Summarize a dataset or a model directory.

    A dataset: frames, inputs, classes (with labels added since ingest), shards, arrays,
    geometry, skipped bad items, preprocessing and ingest parameters, software versions.
    A model directory (model.json): model, classes, inputs, training dataset, split,
    training run, metrics, geometry, preprocessing, software versions.

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
