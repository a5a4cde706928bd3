"""``lcls-dl train``: train the CNN+DNN classifier on an ingested dataset."""
import click

from .common import echo


def config_from_options(**opts):
    """Build a :class:`lcls_dl.models.training.TrainConfig` from CLI option values."""
    from ..models.blueprint import load_blueprint
    from ..models.training import TrainConfig

    blueprint = load_blueprint(opts.pop("blueprint")) if opts.get("blueprint") else None
    return TrainConfig(model=opts["model"], epochs=opts["epochs"], batch_size=opts["batch_size"],
                       lr=opts["lr"], patience=opts["patience"], seed=opts["seed"],
                       val_fraction=opts["val_fraction"], test_fraction=opts["test_fraction"],
                       augment=not opts["no_augment"], calibrate=opts["calibrate"],
                       keep=opts["keep"], blueprint=blueprint,
                       class_weighting=opts["class_weights"], progress=not opts.get("quiet"))


def run_training(dataset_dir, out_dir, config, world=None, **kwargs):
    """Do all the work of ``lcls-dl train`` (see :func:`lcls_dl.models.training.run_training`)."""
    from ..models.training import run_training as _run

    return _run(dataset_dir, out_dir, config, world=world, **kwargs)


def training_options(f):
    """The options of ``train`` (shared with launchers that wrap it)."""
    opts = [
        click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                     help="Model directory to create."),
        click.option("--epochs", default=30, show_default=True, type=click.IntRange(1)),
        click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1),
                     help="Frames per step (per rank)."),
        click.option("--model", "model", default="cnn+dnn", show_default=True,
                     type=click.Choice(["cnn+dnn", "cnn", "dnn"])),
        click.option("--blueprint", type=click.Path(dir_okay=False),
                     help="JSON/YAML file with layers, widths, dropout."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--val-fraction", default=0.15, show_default=True,
                     type=click.FloatRange(0, 1, max_open=True)),
        click.option("--test-fraction", default=0.0, show_default=True,
                     type=click.FloatRange(0, 1, max_open=True),
                     help="Held-out test split, recorded in model.json."),
        click.option("--lr", default=2e-3, show_default=True, type=click.FloatRange(0, min_open=True),
                     help="Peak learning rate (warmup 1 epoch, cosine decay)."),
        click.option("--patience", default=6, show_default=True, type=click.IntRange(0),
                     help="Early stopping patience in epochs (0: off)."),
        click.option("--no-augment", is_flag=True, help="Turn physics augmentations off."),
        click.option("--class-weights/--no-class-weights", default=True, show_default=True,
                     help="Balance classes in the loss."),
        click.option("--calibrate/--no-calibrate", default=True, show_default=True,
                     help="Temperature scaling on the validation split."),
        click.option("--resume", is_flag=True, help="Continue from the newest checkpoint."),
        click.option("--overwrite", is_flag=True, help="Replace an existing model directory."),
        click.option("--keep", default=3, show_default=True, type=click.IntRange(1),
                     help="Epoch checkpoints to keep (plus the best)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.command("train")
@click.argument("dataset_dir", type=click.Path())
@training_options
@click.pass_context
def train(ctx, dataset_dir, out_dir, resume, overwrite, **opts):
    """Train the CNN+DNN classifier on a dataset's labeled frames.

    Writes MODEL_DIR with model.keras, model.json (classes, preprocessing, seed, versions,
    temperature), metrics.csv, curves.png, TensorBoard logs and checkpoints.

    \b
    Example:
      lcls-dl train data1 --out model1 --epochs 20
      lcls-dl train data1 --out model1 --epochs 20 --resume     # after an interruption
      lcls-dl train data1 --out dnn1 --model dnn --blueprint small.yaml
    """
    import sys

    from ..errors import LclsError

    opts["quiet"] = (ctx.obj or {}).get("quiet", False)
    config = config_from_options(**opts)
    if resume and overwrite:
        raise LclsError("--resume and --overwrite exclude each other")
    command = "lcls-dl " + " ".join(sys.argv[1:]) if sys.argv else None
    meta = run_training(dataset_dir, out_dir, config, resume=resume, overwrite=overwrite,
                        command=command)
    tr = meta["training"]
    echo(f"trained {meta['model_kind']} ({tr['params']} parameters) for {tr['epochs_run']} "
         f"epochs in {tr['train_seconds']:.1f} s; best epoch {tr['best_epoch']}"
         + (" (early stop)" if tr["stopped_early"] else ""))
    for split, rep in meta["metrics"].items():
        echo(f"{split}: accuracy {rep['accuracy']:.4f} on {rep['n']} frames, "
             f"ECE {rep['ece']:.4f}")
    if meta.get("calibration"):
        c = meta["calibration"]
        echo(f"temperature {c['temperature']:.3f}: ECE {c['ece_before']:.4f} -> "
             f"{c['ece_after']:.4f} on validation")
    click.echo(f"model written to {out_dir}")
    return 0
