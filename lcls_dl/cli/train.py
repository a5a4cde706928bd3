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
                     help="Peak learning rate for one --batch-size; scaled by the ranks "
                          "(warmup 1 epoch, cosine decay)."),
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


def restart_argv(argv, out_dir):
    """Arguments for restarting a dead job: ``--resume`` when ``out_dir`` has a checkpoint,
    else ``--overwrite`` (start again); the other flag is dropped."""
    from ..models.training import latest_checkpoint

    argv = [a for a in argv if a not in ("--resume", "--overwrite")]
    return argv + (["--resume"] if latest_checkpoint(out_dir) else ["--overwrite"])


def check_before_launch(dataset_dir, out_dir, np_, resume, overwrite, seed, val_fraction,
                        test_fraction):
    """What every rank would check first, done once before ``mpiexec`` starts any rank:
    a bad dataset or model directory gives one line, not one per rank after each has
    started TensorFlow (nothing here imports it)."""
    from ..checkpoints import prepare_out_dir
    from ..dataset import Dataset, labeled_splits

    dataset = Dataset(dataset_dir)
    try:
        labeled_splits(dataset, seed, val_fraction, test_fraction, ranks=np_)
    finally:
        dataset.close()
    prepare_out_dir(out_dir, resume=resume, overwrite=overwrite, create=False)


def _join_world(fault_tolerance):
    """The World of this process: fault tolerant (ULFM) when the launcher asked for it."""
    from ..distributed import ulfm
    from ..distributed.launcher import in_mpi_job

    if not in_mpi_job():
        from ..distributed.local_world import LocalWorld

        return LocalWorld()
    ulfm.prepare_mpi4py()  # before mpi4py.MPI is first imported
    from ..distributed.mpi_world import get_world

    if fault_tolerance and ulfm.ulfm_available():
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            return ulfm.FaultTolerantWorld()
    return get_world()


@click.command("train")
@click.argument("dataset_dir", type=click.Path())
@training_options
@click.option("--np", "np_", default=1, show_default=True, type=click.IntRange(1),
              help="MPI ranks (data-parallel; batch size is per rank, lr scaled linearly).")
@click.option("--hostfile", type=click.Path(exists=True, dir_okay=False),
              help="MPI hostfile for several nodes.")
@click.option("--mpiexec-args", default="", metavar="ARGS",
              help="Extra mpiexec arguments, one quoted string.")
@click.option("--fault-tolerance/--no-fault-tolerance", default=True, show_default=True,
              help="With --np: survive dead ranks (ULFM) where the MPI supports it.")
@click.option("--max-restarts", default=0, show_default=True, type=click.IntRange(0),
              help="With --np: restart a job that died from its last checkpoint this many "
                   "times.")
@click.option("--min-ranks", default=1, show_default=True, type=click.IntRange(1),
              help="Fewest surviving ranks to go on with; below, the job ends (exit 75) "
                   "and --max-restarts restarts it.")
@click.pass_context
def train(ctx, dataset_dir, out_dir, resume, overwrite, np_, hostfile, mpiexec_args,
          fault_tolerance, max_restarts, min_ranks, **opts):
    """Train the CNN+DNN classifier on a dataset's labeled frames.

    Writes MODEL_DIR with model.keras, model.json (classes, preprocessing, seed, versions,
    temperature), metrics.csv, curves.png, TensorBoard logs and checkpoints.

    \b
    Example:
      lcls-dl train data1 --out model1 --epochs 20
      lcls-dl train data1 --out model1 --epochs 20 --resume     # after an interruption
      lcls-dl train data1 --out dnn1 --model dnn --blueprint small.yaml
      lcls-dl train data1 --out model1 --np 4                   # 4 MPI ranks, fault tolerant
      lcls-dl train data1 --out model1 --np 4 --max-restarts 3  # restart if the job dies

    SIGTERM or SIGUSR1 (a scheduler's time limit) stops all ranks after the same step,
    writes a checkpoint, prints the command that resumes and exits 0. Ctrl-C does the
    same and exits 130; a second Ctrl-C ends the run at once.
    """
    import shlex
    import signal
    import sys

    from ..distributed.launcher import in_mpi_job, maybe_launch, split_mpiexec_args
    from ..distributed.signals import STOP_SIGNALS, StopRequest, resume_command
    from ..errors import LclsError

    if resume and overwrite:
        raise LclsError("--resume and --overwrite exclude each other")
    if np_ > 1 and not in_mpi_job():
        launch_args = split_mpiexec_args(mpiexec_args)
        check_before_launch(dataset_dir, out_dir, np_, resume, overwrite, opts["seed"],
                            opts["val_fraction"], opts["test_fraction"])
        return maybe_launch(sys.argv[1:], np_, hostfile=hostfile, mpiexec_args=launch_args,
                            fault_tolerance=fault_tolerance, max_restarts=max_restarts,
                            restart_argv=lambda argv: restart_argv(argv, out_dir),
                            checkpoints=True)
    # installed before MPI/TensorFlow start; Ctrl-C reaches a rank only without our launcher
    stop = StopRequest(STOP_SIGNALS + (signal.SIGINT,))
    world = _join_world(fault_tolerance)
    if world.size > 1:
        from ..distributed.partition import partition
        from ..distributed.threads import configure_threads

        configure_threads(world.comm)   # before TensorFlow starts
    else:
        partition = None

    opts["quiet"] = (ctx.obj or {}).get("quiet", False)
    config = config_from_options(**opts)
    command = shlex.join(["lcls-dl", *sys.argv[1:]])
    try:
        meta = run_training(dataset_dir, out_dir, config, world=world, partition=partition,
                            resume=resume, overwrite=overwrite, command=command, stop=stop,
                            min_ranks=min_ranks)
    finally:
        stop.uninstall()
    if not world.is_root or meta is None:   # rank 0 reports for the job
        return 0
    if meta.get("interrupted"):
        echo(f"stopped by {meta['interrupted']} after epoch {meta['epoch']} + {meta['step']} "
             f"steps; checkpoint {meta['checkpoint']}")
        argv = [a for a in sys.argv if a != "--overwrite"]
        click.echo("resume with: " + resume_command(argv))
        return 130 if stop.interrupted else 0
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
    if tr.get("lost_ranks"):
        echo(f"survived lost rank(s) {tr['lost_ranks']}; finished with {tr['final_world_size']} "
             f"of {tr['world_size']} ranks")
    click.echo(f"model written to {out_dir}")
    return 0
