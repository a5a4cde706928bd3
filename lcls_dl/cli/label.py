"""``lcls-dl label``: import, set, export and show the labels of a dataset."""
import click


@click.group("label")
def label():
    """Import, set and export labels of a dataset.

    Labels live in DATASET/labels.jsonl, an append-only log with who/when/source per
    change; the last change per frame wins. Training reads it, so no re-ingest is needed.

    \b
    Example:
      lcls-dl label import data1 labels.csv          # id,label or file,event,label
      lcls-dl label set data1 run0001.cxi:17 ice
      lcls-dl label export data1 current.csv
      lcls-dl label log data1 --id run0001.cxi:17
    """


def _who_option(f):
    return click.option("--who", help="Who labels (default: your user name).")(f)


@label.command("import")
@click.argument("dataset_dir", type=click.Path(file_okay=False))
@click.argument("csv_file", type=click.Path(dir_okay=False))
@_who_option
@click.option("--source", type=click.Choice(["import", "human", "oracle", "pseudo"]),
              default="import", show_default=True, help="Recorded source of these labels.")
@click.option("--allow-new-class", is_flag=True, help="Accept class names not in the dataset.")
def import_(dataset_dir, csv_file, who, source, allow_new_class):
    """Add the labels of a CSV file (id,label or file,event,label; empty label removes).

    The whole file is checked first: an unknown id or class writes nothing.

    \b
    Example:
      lcls-dl label import data1 next_labeled.csv --who jdoe
    """
    from ..active.label_store import LabelStore
    from ..dataset import load_manifest

    load_manifest(dataset_dir)  # a typo must not create a stray labels.jsonl
    n = LabelStore(dataset_dir).import_csv(csv_file, who=who, source=source,
                                           allow_new_class=allow_new_class)
    click.echo(f"imported {n} label(s) into {dataset_dir}")


@label.command("set")
@click.argument("dataset_dir", type=click.Path(file_okay=False))
@click.argument("sample_id")
@click.argument("label_name")
@_who_option
@click.option("--allow-new-class", is_flag=True, help="Accept a class name not in the dataset.")
def set_(dataset_dir, sample_id, label_name, who, allow_new_class):
    """Set the label of one frame (ID is FILE:EVENT; LABEL 'none' removes it).

    \b
    Example:
      lcls-dl label set data1 run0001.cxi:17 ice
    """
    from ..active.label_store import LabelStore
    from ..dataset import load_manifest

    load_manifest(dataset_dir)  # a typo must not create a stray labels.jsonl
    value = None if label_name.lower() in ("none", "null", "-") else label_name
    LabelStore(dataset_dir).set([sample_id], [value], who=who, source="human",
                                allow_new_class=allow_new_class)
    click.echo(f"{sample_id}: {value if value is not None else '(removed)'}")


@label.command("export")
@click.argument("dataset_dir", type=click.Path(file_okay=False))
@click.argument("csv_file", type=click.Path(dir_okay=False))
@click.option("--history", is_flag=True, help="Every change, not just the current labels.")
@click.option("--include-pseudo", is_flag=True, help="Also export pseudo-labels.")
def export(dataset_dir, csv_file, history, include_pseudo):
    """Write the current labels (id,file,event,label,who,when,source) to a CSV.

    \b
    Example:
      lcls-dl label export data1 current.csv
    """
    from ..active.label_store import LabelStore
    from ..dataset import load_manifest

    load_manifest(dataset_dir)  # a clear error for a wrong directory
    n = LabelStore(dataset_dir).export_csv(csv_file, with_history=history,
                                           exclude_sources=() if include_pseudo else ("pseudo",))
    click.echo(f"wrote {n} row(s) to {csv_file}")


@label.command("log")
@click.argument("dataset_dir", type=click.Path(file_okay=False))
@click.option("--id", "sample_id", multiple=True, help="Only this frame (repeatable).")
@click.option("--tail", type=click.IntRange(min=0), default=20, show_default=True,
              help="Show the last N changes (0: all).")
def log(dataset_dir, sample_id, tail):
    """Show the change history (when, who, source, id, label).

    \b
    Example:
      lcls-dl label log data1 --id run0001.cxi:17
    """
    from ..active.label_store import LabelStore
    from ..dataset import load_manifest

    load_manifest(dataset_dir)
    hist = LabelStore(dataset_dir).history(ids=sample_id or None)
    if tail:
        hist = hist[-tail:]
    for r in hist:
        click.echo(f"{r.get('when', '?')}  {r.get('who', '?'):<12s} {r.get('source', '?'):<7s} "
                   f"{r['id']}  {r.get('label') if r.get('label') is not None else '(removed)'}")
    click.echo(f"{len(hist)} change(s)")
