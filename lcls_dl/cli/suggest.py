"""``lcls-dl suggest-labels``: pick the frames a human should label next."""
import os

import click

STRATEGY_CHOICES = ("least-confidence", "margin", "entropy", "bald", "ensemble", "badge",
                    "kcenter", "random")


@click.command("suggest-labels")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("dataset_dir", type=click.Path(file_okay=False))
@click.option("--budget", "-k", type=click.IntRange(min=1), required=True,
              help="Number of frames to suggest (K).")
@click.option("--strategy", type=click.Choice(STRATEGY_CHOICES), default="margin",
              show_default=True, help="How to score and pick frames.")
@click.option("--mc-passes", type=click.IntRange(min=0), default=None,
              help="Monte-Carlo dropout passes for bald  [default: 20].")
@click.option("--ensemble", "ensemble", multiple=True, type=click.Path(file_okay=False),
              metavar="MODEL_DIR", help="More models for --strategy ensemble (repeatable).")
@click.option("--class-balanced", is_flag=True,
              help="Split the batch evenly over predicted classes.")
@click.option("--diversity", type=click.FloatRange(min=1.0), default=2.0, show_default=True,
              help="Score strategies: thin the top diversity*K frames to K by k-center "
                   "greedy on the embedding (1 = plain top-K).")
@click.option("--previous", type=click.Path(dir_okay=False),
              help="Earlier round's suggestions CSV or .pool.npz for the stability signal "
                   "[default: OUT's own .pool.npz from the last run].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of any random choice.")
@click.option("--np", "np_", type=click.IntRange(min=1), default=1, show_default=True,
              help="Score the pool over N MPI ranks.")
@click.option("--no-contact-sheet", is_flag=True, help="Skip the PNG of suggested frames.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True,
              help="Ranked suggestions CSV (OUT.png, OUT.stopping.json, OUT.pool.npz beside).")
def suggest_labels(model_dir, dataset_dir, budget, strategy, mc_passes, ensemble,
                   class_balanced, diversity, previous, seed, np_, no_contact_sheet, out):
    """Pick the frames a human should label next.

    Scores every unlabeled frame of DATASET_DIR with the model in MODEL_DIR (calibrated
    probabilities), picks K that are uncertain and diverse, and writes a ranked CSV
    (id, file, event, score, predicted class, per-class probabilities), a contact sheet
    PNG of those frames, and the stopping signal (prediction stability vs the previous
    round, share of the pool still uncertain), which is also printed.

    \b
    Example:
      lcls-dl suggest-labels model1 data1 --budget 50 --out next.csv
      lcls-dl suggest-labels model1 data1 -k 50 --strategy bald --mc-passes 20 -o next.csv
      lcls-dl suggest-labels model1 data1 -k 50 --strategy ensemble --ensemble model2 -o n.csv
      lcls-dl label import data1 next_labeled.csv      # then train again
    """
    from ..distributed.launcher import in_mpi_job, maybe_launch
    from .common import verbosity_argv

    if np_ > 1 and not in_mpi_job():  # what every rank would refuse, said once, at once
        from ..active.suggest import check_pool_ranks
        from ..atomic import check_writable
        from ..dataset import Dataset

        check_writable(out, "suggestions")
        dataset = Dataset(dataset_dir)
        try:
            check_pool_ranks(dataset, np_)
        finally:
            dataset.close()
    if np_ > 1:
        argv = ["suggest-labels", os.path.abspath(model_dir), os.path.abspath(dataset_dir),
                "--budget", str(budget), "--strategy", strategy, "--diversity", str(diversity),
                "--seed", str(seed), "--np", str(np_), "--out", os.path.abspath(out)]
        if mc_passes is not None:
            argv += ["--mc-passes", str(mc_passes)]
        for e in ensemble:
            argv += ["--ensemble", os.path.abspath(e)]
        if class_balanced:
            argv.append("--class-balanced")
        if previous:
            argv += ["--previous", os.path.abspath(previous)]
        if no_contact_sheet:
            argv.append("--no-contact-sheet")
        code = maybe_launch(verbosity_argv() + argv, np_)
        if code is not None:
            return code
    from ..active.mpi_scoring import get_world
    from ..active.stopping import format_signal
    from ..active.suggest import suggest_labels as run
    from .common import quiet

    world = get_world() if np_ > 1 else None
    res = run(model_dir, dataset_dir, budget, strategy=strategy, out=out, mc_passes=mc_passes,
              ensemble=ensemble, class_balanced=class_balanced, diversity=diversity, seed=seed,
              world=world, previous=previous, contact_sheet=not no_contact_sheet,
              show_progress=not quiet())
    if res is None:  # a non-root MPI rank
        return 0
    n_ranks = world.size if world is not None else 1
    click.echo(f"scored {res.pool_size} unlabeled frames on {n_ranks} rank(s); suggested "
               f"{len(res.rows)} ({strategy})")
    for row in res.rows[:5]:
        click.echo(f"  #{row['rank']:<3d} {row['id']:<32s} score {row['score']:.3f}  "
                   f"pred {row['predicted']}")
    if len(res.rows) > 5:
        click.echo(f"  ... {len(res.rows) - 5} more")
    click.echo(format_signal(res.signal))
    for key in ("csv", "png", "stopping"):
        if key in res.paths:
            click.echo(f"{key:>9s}: {res.paths[key]}")
    return 0
