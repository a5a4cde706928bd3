"""``lcls-dl demo``: the whole pipeline end to end on simulated data, in a few minutes."""
import os
import re
import subprocess
import time

import click

from ..distributed.launcher import lcls_dl_command
from ..errors import LclsError

# small sizes: the whole demo stays well under 10 minutes on a 2-core laptop
DEMO_SIZES = {"frames": 240, "test_frames": 90, "first_labels": 60, "epochs": 15,
              "budget": 12, "loop_rounds": 2, "loop_budget": 10, "loop_seed": 16,
              "loop_holdout": 60, "loop_epochs": 6, "loop_min_steps": 60}


def _lcls(args, log, env):
    """Run ``lcls-dl ARGS``; tee its output into the demo log; raise on failure."""
    cmd = lcls_dl_command() + [str(a) for a in args]
    shown = "lcls-dl " + " ".join(map(str, args))
    click.echo(f"\n$ {shown}", err=True)
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {shown}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, env=env)
        fh.write(proc.stdout)
    out = re.sub(r"(?m)^\[\d+,\d+\]<stdout>: ?", "", proc.stdout).strip()
    if out:
        click.echo("  " + out.replace("\n", "\n  "), err=True)
    if proc.returncode != 0:
        raise LclsError(f"demo step failed with exit code {proc.returncode}: {shown} "
                        f"(see the log)", log)
    return time.perf_counter() - t0


@click.command("demo")
@click.argument("out_dir", type=click.Path(file_okay=False), default="lcls-dl-demo")
@click.option("--np", "np_", type=click.IntRange(min=1), default=2, show_default=True,
              help="MPI ranks for training and scoring.")
@click.option("--frames", type=click.IntRange(min=60), default=DEMO_SIZES["frames"],
              show_default=True, help="Simulated frames in the training run.")
@click.option("--seed", type=int, default=7, show_default=True)
def demo(out_dir, np_, frames, seed):
    """Run the whole pipeline end to end on simulated data.

    Simulates a small LCLS run (and a separate test run), ingests both, labels a first
    few frames, trains over --np MPI ranks, evaluates on the test run, suggests the next
    frames to label, runs two rounds of the simulated labeling loop, and prints where
    each output is. About 3-6 minutes on a 2-core laptop.

    \b
    Example:
      lcls-dl demo
      lcls-dl demo /tmp/demo --np 1
    """
    from ..active.label_store import read_label_csv

    out = os.path.abspath(out_dir)
    if os.path.isdir(out) and os.listdir(out):
        raise LclsError("demo output directory is not empty (choose another)", out)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "demo.log")
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("PYTHONWARNINGS", "ignore")
    z = DEMO_SIZES
    p = {k: os.path.join(out, v) for k, v in {
        "run": "run1", "test_run": "run2", "data": "data1", "test_data": "data2",
        "first": "first_labels.csv", "model": "model1", "eval": "evaluation",
        "suggest": "suggestions.csv", "loop": "loop"}.items()}
    t_all = time.perf_counter()
    steps = []
    steps.append(("simulate", _lcls(["-q", "simulate", p["run"], "--frames", frames,
                                     "--seed", seed], log, env)))
    steps.append(("simulate test run", _lcls(
        ["-q", "simulate", p["test_run"], "--frames", z["test_frames"], "--seed", seed + 1,
         "--run", 2], log, env)))
    steps.append(("ingest", _lcls(["-q", "ingest", p["run"], "--out", p["data"],
                                   "--shard-size", 100], log, env)))
    steps.append(("ingest test run", _lcls(
        ["-q", "ingest", p["test_run"], "--labels", os.path.join(p["test_run"], "truth.csv"),
         "--out", p["test_data"]], log, env)))
    # a scientist labels a first random handful: import them into the label store
    ids, labels = read_label_csv(os.path.join(p["run"], "truth.csv"))
    import numpy as np

    pick = np.sort(np.random.default_rng(seed).permutation(len(ids))[:z["first_labels"]])
    from ..atomic import atomic_open

    with atomic_open(p["first"], "w", encoding="utf-8") as fh:
        fh.write("id,label\n")
        for k in pick:
            fh.write(f"{ids[k]},{labels[k]}\n")
    steps.append(("label import", _lcls(["label", "import", p["data"], p["first"],
                                         "--who", "demo", "--source", "human"], log, env)))
    train = ["-q", "train", p["data"], "--out", p["model"], "--epochs", z["epochs"],
             "--patience", 0]
    if np_ > 1:
        train += ["--np", np_]
    steps.append(("train", _lcls(train, log, env)))
    steps.append(("evaluate", _lcls(["evaluate", p["model"], p["test_data"], "--out",
                                     p["eval"]], log, env)))
    steps.append(("suggest-labels", _lcls(
        ["-q", "suggest-labels", p["model"], p["data"], "--budget", z["budget"],
         "--strategy", "margin", "--np", np_, "--out", p["suggest"]], log, env)))
    steps.append(("active-loop", _lcls(
        ["-q", "active-loop", p["data"], "--truth", os.path.join(p["run"], "truth.csv"),
         "--rounds", z["loop_rounds"], "--budget", z["loop_budget"], "--seed-labels",
         z["loop_seed"], "--holdout", z["loop_holdout"], "--strategies", "margin",
         "--epochs", z["loop_epochs"], "--min-steps", z["loop_min_steps"], "--seed", seed,
         "--out", p["loop"]], log, env)))
    total = time.perf_counter() - t_all
    stem = p["suggest"][:-4]
    click.echo(f"\ndemo finished in {total:.0f} s; outputs:")
    where = [("simulated runs (CXI + truth.csv)", f"{p['run']}, {p['test_run']}"),
             ("datasets (shards + manifest + labels.jsonl)", f"{p['data']}, {p['test_data']}"),
             ("model (model.keras, model.json, curves.png)", p["model"]),
             ("evaluation on the test run", p["eval"]),
             ("suggested frames to label", p["suggest"]),
             ("contact sheet of suggestions", stem + ".png"),
             ("stopping signal", stem + ".stopping.json"),
             ("label-efficiency curve", os.path.join(p["loop"], "curve.png")),
             ("label-efficiency table", os.path.join(p["loop"], "curve.csv")),
             ("log of every command", log)]
    for what, path in where:
        click.echo(f"  {what:<46s} {path}")
    click.echo("step times: " + ", ".join(f"{name} {sec:.0f}s" for name, sec in steps))
    return 0
