"""``lcls-dl evaluate``: score a trained model on a labeled dataset."""
import json
import os

import click

from .common import echo


def evaluate_dataset(model_dir, dataset_dir, split="all", batch_size=256):
    """Metrics of a model on a dataset's labeled frames.

    Parameters
    ----------
    split : {"all", "train", "val", "test"}
        ``all`` scores every labeled frame; the others re-create the model's training split
        (only for the dataset the model was trained on).

    Returns
    -------
    (report dict, y, p, rows)
        ``report`` from :func:`lcls_dl.models.metrics.classification_report` plus model and
        dataset facts; ``y`` labels, ``p`` calibrated probabilities, ``rows`` dataset rows.
    """
    from ..dataset import Dataset
    from ..errors import ConfigError, InputError
    from ..models.calibration import softmax
    from ..models.data import split_rows
    from ..models.metrics import classification_report
    from ..models.model_dir import (check_preprocessing, dataset_logits, load_metadata,
                                    load_model_dir, map_labels)

    meta = load_metadata(model_dir)
    ds = Dataset(dataset_dir)
    check_preprocessing(meta.get("preprocessing"), ds.preprocessing, where=dataset_dir)
    labels = map_labels(meta["classes"], ds.classes, ds.labels, ds.ids, where=dataset_dir)
    rows = ds.labeled
    if split != "all":
        if ds.checksum != meta["dataset"]["manifest_checksum"]:
            raise ConfigError(f"--split {split} needs the dataset the model was trained on "
                              f"(manifest checksum differs)", dataset_dir)
        s = meta["split"]
        rows = split_rows(ds.ids, ds.labels, s["seed"], s["val_fraction"],
                          s["test_fraction"])[split]
    if len(rows) == 0:
        raise InputError("no labeled frames to evaluate" + ("" if split == "all"
                                                            else f" in the {split} split"),
                         dataset_dir)
    model, meta = load_model_dir(model_dir)
    logits = dataset_logits(model, ds, rows, batch_size)
    p = softmax(logits, float(meta.get("temperature", 1.0) or 1.0))
    y = labels[rows]
    report = classification_report(y, p, meta["classes"])
    report.update({"model_dir": os.path.abspath(model_dir),
                   "dataset_dir": os.path.abspath(dataset_dir), "split": split,
                   "temperature": meta.get("temperature", 1.0),
                   "dataset_checksum": ds.checksum, "model_kind": meta.get("model_kind")})
    ds.close()
    return report, y, p, rows


def format_table(report):
    """Per-class precision/recall/F1/AUC table plus totals and the confusion matrix."""
    classes = report["classes"]
    w = max(8, *(len(c) for c in classes))
    lines = [f"{'class':<{w}}  precision  recall     f1   roc_auc  support"]
    for c in classes:
        r = report["per_class"][c]
        lines.append(f"{c:<{w}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:6.4f}  "
                     f"{r['roc_auc']:8.4f}  {r['support']:7d}")
    lines.append(f"accuracy {report['accuracy']:.4f} on {report['n']} frames; macro F1 "
                 f"{report['macro_f1']:.4f}; macro ROC AUC {report['macro_roc_auc']:.4f}; "
                 f"ECE {report['ece']:.4f}; log loss {report['log_loss']:.4f}")
    lines.append("confusion (rows true, columns predicted):")
    lines.append(" " * (w + 2) + " ".join(f"{c[:8]:>8}" for c in classes))
    for c, row in zip(classes, report["confusion"]):
        lines.append(f"{c:<{w}}  " + " ".join(f"{v:8d}" for v in row))
    return "\n".join(lines)


@click.command("evaluate")
@click.argument("model_dir", type=click.Path())
@click.argument("dataset_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where metrics.json, confusion.png, roc.png go "
                   "[default: MODEL_DIR/evaluation/<dataset name>].")
@click.option("--split", default="all", show_default=True,
              type=click.Choice(["all", "train", "val", "test"]),
              help="Score only one split of the training dataset.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
def evaluate(model_dir, dataset_dir, as_json, out_dir, split, batch_size):
    """Score a trained model on a labeled dataset.

    Accuracy, per-class precision/recall/F1, one-vs-rest ROC AUC, confusion matrix and
    expected calibration error. Refuses a dataset preprocessed differently from the
    model's training data.

    \b
    Example:
      lcls-dl evaluate model1 data2
      lcls-dl evaluate model1 data1 --split test --json
    """
    from ..atomic import write_json
    from ..models.plots import plot_confusion, plot_roc

    report, y, p, _ = evaluate_dataset(model_dir, dataset_dir, split, batch_size)
    if out_dir is None:
        name = os.path.basename(os.path.abspath(dataset_dir)) + ("" if split == "all"
                                                                 else f"-{split}")
        out_dir = os.path.join(model_dir, "evaluation", name)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "metrics.json"), report)
    plot_confusion(report["confusion"], report["classes"], os.path.join(out_dir, "confusion.png"))
    plot_roc(y, p, report["classes"], os.path.join(out_dir, "roc.png"))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_table(report))
        echo(f"wrote metrics.json, confusion.png, roc.png to {out_dir}")
    return 0
