"""``lcls-dl active-loop``: measure label efficiency with a simulated labeler."""
import click

STRATEGY_CHOICES = ("least-confidence", "margin", "entropy", "bald", "ensemble", "badge",
                    "kcenter", "random")


def _strategies(ctx, param, value):
    out = []
    for item in value or ():
        for s in item.split(","):
            s = s.strip()
            if not s:
                continue
            if s not in STRATEGY_CHOICES:
                raise click.BadParameter(f"{s!r} is not one of {', '.join(STRATEGY_CHOICES)}")
            out.append(s)
    return tuple(dict.fromkeys(out))


@click.command("active-loop")
@click.argument("dataset_dir", type=click.Path(file_okay=False))
@click.option("--truth", required=True, type=click.Path(dir_okay=False),
              help="True labels (id,label or file,event,label), e.g. simulate's truth.csv.")
@click.option("--rounds", "-r", type=click.IntRange(min=0), default=5, show_default=True,
              help="Suggest/reveal rounds after the seed set.")
@click.option("--budget", "-k", type=click.IntRange(min=1), default=20, show_default=True,
              help="Labels revealed per round.")
@click.option("--seed-labels", type=click.IntRange(min=2), default=20, show_default=True,
              help="Random labels to start from (same for every strategy).")
@click.option("--strategies", multiple=True, callback=_strategies, metavar="S[,S...]",
              help="Strategies to compare (random is always added)  [default: margin,badge].")
@click.option("--holdout", type=click.IntRange(min=1), default=500, show_default=True,
              help="Frames held out to measure accuracy (never labeled).")
@click.option("--model", type=click.Choice(["cnn+dnn", "cnn", "dnn"]), default="cnn+dnn",
              show_default=True, help="Model trained every round (small blueprint).")
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True,
              help="Epochs per round (raised to reach --min-steps with few labels).")
@click.option("--min-steps", type=click.IntRange(min=0), default=120, show_default=True,
              help="At least this many optimizer steps per round's training.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--blueprint", type=click.Path(dir_okay=False), help="JSON/YAML model blueprint.")
@click.option("--mc-passes", type=click.IntRange(min=2), default=10, show_default=True,
              help="Monte-Carlo dropout passes for bald.")
@click.option("--diversity", type=click.FloatRange(min=1.0), default=2.0, show_default=True,
              help="Thin the top diversity*K frames to K by k-center (score strategies).")
@click.option("--pseudo-threshold", type=click.FloatRange(0.5, 1.0), default=None,
              help="Also report accuracy with pseudo-labels for frames at or above this "
                   "top probability (never counted as labels).")
@click.option("--target", type=click.FloatRange(0, 1), default=0.97, show_default=True,
              help="Held-out accuracy whose label cost is reported.")
@click.option("--max-pool", type=click.IntRange(min=1), default=None,
              help="Score at most this many pool frames per round (random subset).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Directory for curve.csv, curve.png, summary.json.")
def active_loop(dataset_dir, truth, rounds, budget, seed_labels, strategies, holdout, model,
                epochs, min_steps, batch_size, blueprint, mc_passes, diversity,
                pseudo_threshold, target, max_pool, seed, out):
    """Measure label efficiency with a simulated labeler.

    Simulates the scientist with the truth file: from one random seed set, rounds of
    train -> suggest -> reveal labels -> retrain for each strategy and for random
    sampling, on the same pool and the same held-out frames. Writes accuracy vs number
    of labels (curve.csv, curve.png with one curve per strategy) and summary.json with
    the labels each strategy needed to reach --target. Nothing is written to the
    dataset's label store.

    \b
    Example:
      lcls-dl active-loop data1 --truth run1/truth.csv --rounds 8 --budget 25 --out loop1
      lcls-dl active-loop data1 --truth run1/truth.csv -r 5 -k 20 \\
          --strategies margin,bald,badge,kcenter --pseudo-threshold 0.99 --out loop2
    """
    from ..active.loop import LoopConfig, run_active_loop
    from ..models.blueprint import load_blueprint
    from .common import echo

    cfg = LoopConfig(rounds=rounds, budget=budget, seed_labels=seed_labels, holdout=holdout,
                     strategies=strategies or ("margin", "badge"), model=model, epochs=epochs,
                     min_steps=min_steps, batch_size=batch_size, mc_passes=mc_passes,
                     diversity=diversity, pseudo_threshold=pseudo_threshold, target=target,
                     max_pool=max_pool,
                     seed=seed, blueprint=load_blueprint(blueprint) if blueprint else None)
    res = run_active_loop(dataset_dir, truth, out, cfg, progress=lambda m: echo(m, err=True))
    click.echo(f"labels to reach {target:.1%} held-out accuracy "
               f"({res['frames']['holdout']} held-out frames, pool {res['frames']['pool']}):")
    for s, n in res["labels_to_target"].items():
        ratio = res["ratio_to_random"].get(s)
        extra = ""
        if isinstance(ratio, float):
            extra = f"  ({ratio:.2f} x random)"
        elif isinstance(ratio, str):
            extra = f"  ({ratio} x random)"
        got = n if n is not None else f"not reached (max {res['max_labels'][s]} labels, " \
                                      f"final {res['final_accuracy'][s]:.3f})"
        click.echo(f"  {s:>16s}: {got}{extra}")
    for key in ("csv", "png", "summary"):
        click.echo(f"{key:>9s}: {res['paths'][key]}")
    return 0
