"""Label efficiency benchmark: labels needed to reach 97% held-out accuracy, per strategy.

On a simulated water/ice pool (default 4,000 frames, balanced water/ice, no misses) with a
fixed held-out set, runs :func:`lcls_dl.active.loop.run_active_loop` for each strategy and for
random sampling (random follows its own, coarser schedule so it can reach the larger label
counts it needs) and prints a markdown table: labels to target, ratio to random, final accuracy,
seconds. Targets (issue 7): best strategy <= 300 labels and <= 1/3 of random.

Usage::

    python benchmarks/active_bench.py --workdir /tmp/active_bench            # simulate+ingest
    python benchmarks/active_bench.py --dataset data_a data_b \\
        --truth run_a/truth.csv run_b/truth.csv --workdir /tmp/ab             # reuse datasets
    python benchmarks/active_bench.py --tiny --workdir /tmp/ab_tiny          # seconds, a check

Several ``--dataset`` directories (same preprocessing) are combined into one pool by linking
their shards into ``WORKDIR/pool`` (no copy, no re-ingest).
"""
import argparse
import json
import os
import subprocess
import sys
import time



def _lcls(*args):
    cmd = [sys.executable, "-m", "lcls_dl", *map(str, args)]
    print("$ lcls-dl " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


def combine_datasets(dirs, out):
    """Link the shards of several ingested datasets into one dataset directory ``out``."""
    from lcls_dl.atomic import write_json
    from lcls_dl.dataset import load_manifest
    from lcls_dl.ingest.shard_writer import shard_name

    manifests = [load_manifest(d) for d in dirs]
    pre0 = {k: v for k, v in manifests[0]["preprocessing"].items()}
    for d, m in zip(dirs[1:], manifests[1:]):
        if m["preprocessing"] != pre0:
            raise SystemExit(f"{d}: preprocessing differs from {dirs[0]}")
    os.makedirs(out, exist_ok=True)
    shards, k = [], 0
    classes = []
    for d, m in zip(dirs, manifests):
        for c in m.get("classes", []):
            if c not in classes:
                classes.append(c)
    for d, m in zip(dirs, manifests):
        for sh in m["shards"]:
            name = shard_name(k)
            link = os.path.join(out, name)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(os.path.abspath(os.path.join(d, sh["name"])), link)
            shards.append(dict(sh, name=name))
            k += 1
    manifest = dict(manifests[0])
    manifest.update({"shards": shards, "n_frames": sum(s["frames"] for s in shards),
                     "classes": classes,
                     "inputs": sum((m.get("inputs", []) for m in manifests), []),
                     "command": "benchmarks/active_bench.py combine " + " ".join(dirs)})
    # labels of the source datasets would be ignored by the loop anyway; keep them
    write_json(os.path.join(out, "manifest.json"), manifest)
    return out


def combine_truth(paths, out):
    from lcls_dl.active.label_store import read_label_csv

    with open(out, "w", encoding="utf-8") as fh:
        fh.write("id,label\n")
        for p in paths:
            ids, labels = read_label_csv(p)
            for i, lab in zip(ids, labels):
                if lab is not None:
                    fh.write(f"{i},{lab}\n")
    return out


def tiny_dataset(workdir):
    """A 400-frame synthetic dataset from the test helpers (for a quick check of the script)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from helpers_data import make_dataset

    from lcls_dl.dataset import Dataset

    data = make_dataset(os.path.join(workdir, "tiny"), n=400, shape=(16, 32), n_q=16, seed=4,
                        shard_size=200)
    ds = Dataset(data, use_label_store=False)
    truth = os.path.join(workdir, "tiny_truth.csv")
    with open(truth, "w") as fh:
        fh.write("id,label\n")
        for i, lab in zip(ds.ids, ds.labels):
            fh.write(f"{i},{ds.classes[lab]}\n")
    return data, truth


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dataset", nargs="*", help="ingested dataset dir(s) to reuse")
    ap.add_argument("--truth", nargs="*", help="truth CSV(s) for --dataset")
    ap.add_argument("--frames", type=int, default=4000)
    ap.add_argument("--sim-seed", type=int, default=11)
    ap.add_argument("--strategies", default="margin,badge")
    ap.add_argument("--seed-labels", type=int, default=20)
    ap.add_argument("--budget", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=29)
    ap.add_argument("--random-budget", type=int, default=250)
    ap.add_argument("--random-rounds", type=int, default=12)
    ap.add_argument("--holdout", type=int, default=1000)
    ap.add_argument("--model", default="dnn")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--max-pool", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-stop-at-target", action="store_true",
                    help="run every round even after reaching the target")
    ap.add_argument("--tiny", action="store_true", help="tiny synthetic data, seconds")
    args = ap.parse_args(argv)

    os.makedirs(args.workdir, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    t0 = time.perf_counter()
    if args.tiny:
        data, truth = tiny_dataset(args.workdir)
        args.holdout = min(args.holdout, 100)
        args.epochs = min(args.epochs, 4)
        args.rounds = min(args.rounds, 2)
        args.random_rounds = min(args.random_rounds, 2)
        args.random_budget = min(args.random_budget, 20)
        args.budget = min(args.budget, 10)
        args.seed_labels = min(args.seed_labels, 10)
        args.model = "dnn"
    elif args.dataset:
        if not args.truth or len(args.truth) != len(args.dataset):
            ap.error("give one --truth per --dataset")
        data = (args.dataset[0] if len(args.dataset) == 1
                else combine_datasets(args.dataset, os.path.join(args.workdir, "pool")))
        truth = (args.truth[0] if len(args.truth) == 1
                 else combine_truth(args.truth, os.path.join(args.workdir, "truth.csv")))
    else:
        run = os.path.join(args.workdir, "run")
        data = os.path.join(args.workdir, "data")
        if not os.path.isfile(os.path.join(data, "manifest.json")):
            _lcls("-q", "simulate", run, "--frames", args.frames, "--seed", args.sim_seed,
                  "--mix", "water=0.5,ice=0.5,miss=0", "--overwrite")
            _lcls("-q", "ingest", run, "--out", data)
        truth = os.path.join(run, "truth.csv")
    t_data = time.perf_counter() - t0

    from lcls_dl.active.loop import LoopConfig, run_active_loop

    cfg = LoopConfig(rounds=args.rounds, budget=args.budget, seed_labels=args.seed_labels,
                     holdout=args.holdout, strategies=tuple(args.strategies.split(",")),
                     model=args.model, epochs=args.epochs, target=args.target,
                     max_pool=args.max_pool, random_budget=args.random_budget,
                     random_rounds=args.random_rounds,
                     stop_at_target=not args.no_stop_at_target, seed=args.seed)
    out = os.path.join(args.workdir, "loop")
    res = run_active_loop(data, truth, out, cfg, progress=lambda m: print(m, flush=True))
    secs = {}
    for r in res["curve"]:
        secs[r["strategy"]] = secs.get(r["strategy"], 0.0) + r["seconds"]
    print(f"\npool {res['frames']['pool']} frames, held out {res['frames']['holdout']}, "
          f"seed set {res['frames']['seed_labels']}, classes {res['classes']}; data prep "
          f"{t_data:.0f} s, loop {res['seconds']:.0f} s; cpu cores {os.cpu_count()}")
    print(f"\n| strategy | labels to {args.target:.0%} | x random | final accuracy (labels) "
          "| seconds |")
    print("|---|---|---|---|---|")
    for s, n in res["labels_to_target"].items():
        ratio = res["ratio_to_random"][s]
        ratio = f"{ratio:.2f}" if isinstance(ratio, float) else (ratio or "-")
        print(f"| {s} | {n if n is not None else 'not reached'} | {ratio} | "
              f"{res['final_accuracy'][s]:.4f} ({res['max_labels'][s]}) | {secs[s]:.0f} |")
    strategies = list(res["labels_to_target"])
    print("\nlabels needed to reach each held-out accuracy (- = not reached):\n")
    print("| accuracy | " + " | ".join(strategies) + " |")
    print("|---|" + "---|" * len(strategies))
    for t, need in res["labels_to_accuracy"].items():
        print(f"| {float(t):.0%} | " + " | ".join(
            str(need[s]) if need[s] is not None else "-" for s in strategies) + " |")
    best = [n for s, n in res["labels_to_target"].items() if s != "random" and n is not None]
    rnd = res["labels_to_target"].get("random")
    verdict = {"best_labels": min(best) if best else None, "random_labels": rnd,
               "target_best_le_300": bool(best and min(best) <= 300),
               "target_le_third_of_random": bool(best and (
                   (rnd is not None and min(best) <= rnd / 3) or
                   (rnd is None and min(best) <= res["max_labels"]["random"] / 3)))}
    print("\n" + json.dumps(verdict))
    print(f"outputs: {res['paths']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
