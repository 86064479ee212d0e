"""Accuracy benchmark: DCQ (queue = 10% of the classes) against Partial FC (10%)
and a full softmax on a synthetic long-tailed identity set shaped like the DCQ
paper's training data (many identities, most of them with a handful of images).

The data set and the rules below were fixed before any head was measured on it,
and are not changed to favour one:

- 20,000 training identities, image counts drawn from a log-normal with median 3
  (clipped to 1..100): 88% of the identities have fewer than 10 images, a quarter
  have one; 3x16x16 images (the identity count and the tail matter more here
  than the resolution);
- "heldout": 1000 identities never seen in training, 4 images each (open-set
  verification: the overall score);
- "tail": fresh images (not trained on) of 1000 training identities with <= 3
  training images; "head": the same for 1000 identities with >= 12;
- every set reports 10-fold accuracy on 6000 balanced pairs and TAR at FAR 1e-3
  and 1e-4 over all pairs of the set, with flip test-time augmentation.

Every head trains the same small CNN with the same recipe, budget (6 epochs) and
seeds (0, 1, 2); only the head differs. DCQ is evaluated twice: with the feature
extractor ("backbone") and with the weight generator ("generator", its EMA, which
the official DCQ code evaluates). DCQ's levers (the generator momentum schedule
and the queue warm-up) take the values that ``--calibrate`` chose on a separate,
smaller calibration set (another data seed, another training seed); the
ablation runs switch one lever at a time.

    python benchmarks/accuracy.py               # the committed results (accuracy.json / .png)
    python benchmarks/accuracy.py --quick       # a smoke run of well under a minute (accuracy_quick.*)
    python benchmarks/accuracy.py --calibrate   # the lever calibration (accuracy_calibration.json)
    python benchmarks/accuracy.py --diagnose    # DCQ with a queue of 100% of the classes (accuracy_diagnostics.json)

``--jobs N`` trains N runs at a time in separate processes of ``--threads``
torch threads each (the default, one at a time, is what the committed results used).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dcq_ops.training.backbones import build_backbone  # noqa: E402
from dcq_ops.training import TrainConfig, train  # noqa: E402
from dcq_ops.training.synthetic import load_synthetic  # noqa: E402
from dcq_ops.training.verification import embed, verification_report  # noqa: E402
from accuracy_report import (LABELS, METRICS, SETS, plot, summarise, table, time_table,  # noqa: E402,F401
                             verdicts)
from common import hardware as harness_hardware, meta, write_json  # noqa: E402


# --------------------------------------------------------------------------- the fixed settings

# The benchmark's data set: TrainConfig fields (fixed before any head was measured).
DATA = dict(synthetic_identities=20000, synthetic_eval_identities=1000, synthetic_median_images=3.0,
            synthetic_max_images=100, image_size=16, synthetic_seed=0)
# The recipe of every run: a small CNN, CosFace (s = 32, m = 0.3), SGD with a
# linear warm-up then cosine decay, batch 128, 6 epochs (4644 steps of 128 on
# the 99,164 training images).
RECIPE = dict(backbone="small_cnn", width=16, embedding_size=128, batch_size=128, epochs=6.0, warmup_epochs=1.0,
              optimizer="sgd", lr=0.1, weight_decay=5e-4, sgd_momentum=0.9, schedule="cosine", clip_grad=5.0,
              margin="cosface", scale=32.0, margin_value=0.3, sample_rate=0.1, eval_pairs=6000)
SEEDS = (0, 1, 2)

# The calibration set: another data seed, half the identities, another training
# seed. The run has as many steps as a benchmark run (so that an EMA time
# constant is the same fraction of it) and the same warm-up in steps.
CALIBRATION_DATA = dict(DATA, synthetic_identities=10000, synthetic_seed=1)
CALIBRATION_SEEDS = (100, 101)

# --quick: a smoke run of every variant (the numbers mean little).
QUICK_DATA = dict(synthetic_identities=2000, synthetic_eval_identities=200, synthetic_median_images=3.0,
                  synthetic_max_images=100, image_size=16, synthetic_seed=0)
QUICK_RECIPE = dict(RECIPE, width=8, embedding_size=64, batch_size=64, epochs=1.0, steps=60, warmup_epochs=0.2,
                    eval_pairs=2000)

# DCQ's levers as --calibrate chose them (benchmarks/results/accuracy_calibration.json,
# benchmarks/ACCURACY.md); they are also TrainConfig's defaults.
DCQ_LEVERS = dict(momentum=0.99, momentum_schedule="constant", momentum_end=0.999, queue_warmup="empty")

HEADS = ("dcq", "partial_fc", "softmax")


def variants() -> dict:
    """name -> TrainConfig fields of the head: the comparison, then the ablations
    (DCQ with one lever switched away from DCQ_LEVERS)."""
    out = {"dcq": dict(head="dcq", eval_model="both", **DCQ_LEVERS),
           "partial_fc": dict(head="partial_fc"), "softmax": dict(head="softmax")}
    for name, change, label in ablations():
        out[name] = dict(head="dcq", eval_model="both", **{**DCQ_LEVERS, **change})
        LABELS[name] = label
    return out


def ablations() -> list[tuple[str, dict, str]]:
    """(name, lever change, label): the momentum schedule away from the chosen one
    (including the paper's constant 0.999), and the queue warm-up away from the chosen one."""
    out = []
    schedules = {"constant_0.99": dict(momentum=0.99, momentum_schedule="constant"),
                 "constant_0.999": dict(momentum=0.999, momentum_schedule="constant"),
                 "cosine_0.99_0.999": dict(momentum=0.99, momentum_schedule="cosine", momentum_end=0.999)}
    for key, change in schedules.items():
        if all(DCQ_LEVERS.get(k) == v for k, v in change.items()):
            continue  # the chosen one
        out.append((f"dcq_momentum_{key}", change, f"ablation: DCQ, momentum {key.replace('_', ' ')}"))
    chosen = DCQ_LEVERS["queue_warmup"]
    other = "random" if chosen == "empty" else "empty"
    out.append((f"dcq_queue_{other}", dict(queue_warmup=other), f"ablation: DCQ, queue warm-up {other}"))
    return out


# The calibration's candidates, in two stages (see choose_levers).
MOMENTUM_CANDIDATES = {
    "constant_0.99": dict(momentum=0.99, momentum_schedule="constant"),      # the incumbent (the old default)
    "constant_0.999": dict(momentum=0.999, momentum_schedule="constant"),    # the paper's
    "cosine_0.99_0.999": dict(momentum=0.99, momentum_schedule="cosine", momentum_end=0.999),  # BYOL-style rise
}
WARMUP_CANDIDATES = ("empty", "random", "prefill")  # "empty" is the incumbent
# A candidate replaces the incumbent only if it scores this many points higher
# (about the seed-to-seed spread of heldout TAR@1e-3 measured before).
MIN_GAIN_POINTS = 0.5


def score(run: dict) -> float:
    """The calibration score: heldout TAR@FAR=1e-3, averaged over the backbone and
    the generator evaluation (both are reported; neither is favoured)."""
    values = [run["evals"][m]["heldout"]["tar@far=0.001"] for m in ("backbone", "generator")]
    return sum(values) / len(values)


def choose(scores: dict, incumbent: str) -> str:
    """The best candidate by mean score over the calibration seeds, unless it beats
    the incumbent by less than MIN_GAIN_POINTS: then the incumbent."""
    best = max(scores, key=scores.get)
    return best if 100 * (scores[best] - scores[incumbent]) >= MIN_GAIN_POINTS else incumbent


# --------------------------------------------------------------------------- running


def run_one(spec: dict) -> dict:
    """Train one run (spec: variant, seed, TrainConfig fields) and return its record."""
    config = TrainConfig(**spec["config"])
    t0 = time.perf_counter()
    result = train(config)
    trainer = result.pop("trainer")
    wall = time.perf_counter() - t0
    history = result["history"]
    evals = {"backbone": result["final_eval"]}
    if "final_eval_generator" in result:
        evals["generator"] = result["final_eval_generator"]
    keep = ("accuracy", "accuracy_std", "tar@far=0.001", "tar@far=0.0001")
    evals = {m: {s: {k: r[k] for k in keep if k in r} for s, r in sets.items()} for m, sets in evals.items()}
    # The loss curve: every logged step of the first 50 (the queue warm-up), then every 50th.
    curve = [(h["step"], round(h["loss"], 4)) for h in history if h["step"] <= 50 or h["step"] % 50 == 0
             or h is history[-1]]
    run = {"variant": spec["variant"], "head": config.head, "seed": config.seed, "steps": result["steps"],
           "train_seconds": history[-1]["elapsed_s"], "wall_seconds": wall,
           "samples_per_s": result["steps"] * config.batch_size / history[-1]["elapsed_s"],
           "final_loss": history[-1]["loss"], "evals": evals, "loss_curve": curve}
    if config.head == "dcq":
        run["queue_size"] = trainer.head.loss.queue_size
        run["levers"] = {k: getattr(config, k) for k in ("momentum", "momentum_schedule", "momentum_end",
                                                         "queue_warmup")}
    elif config.head == "partial_fc":
        run["classes_sampled"] = trainer.head.num_sample
    return run


def describe(run: dict) -> str:
    parts = []
    for model, sets in run["evals"].items():
        tag = "" if model == "backbone" else "[gen] "
        parts.append(tag + " ".join(f"{name} {100 * sets[name]['tar@far=0.001']:.2f}" for name in SETS if name in sets))
    return (f"seed {run['seed']} {run['variant']:28s} {run['train_seconds']:6.0f}s loss {run['final_loss']:.3f} "
            f"| TAR@1e-3 " + " | ".join(parts))


def run_all(specs: list[dict], jobs: int, log=print) -> list[dict]:
    """Every spec, ``jobs`` at a time (separate processes when jobs > 1), in spec order."""
    if jobs <= 1:
        runs = []
        for spec in specs:
            runs.append(run_one(spec))
            log(describe(runs[-1]))
        return runs
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked OpenMP state
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = [pool.submit(run_one, spec) for spec in specs]
        for future in concurrent.futures.as_completed(futures):
            log(describe(future.result()))
        return [f.result() for f in futures]


def hardware(args) -> dict:
    hw = harness_hardware()
    return {"machine": hw["machine"], "processor": hw["cpu"], "cpus": hw["cpu_count"],
            "torch_threads_per_run": args.threads, "jobs": args.jobs, "torch": torch.__version__,
            "python": platform.python_version(), "device": "cpu", "load_average_1min": hw["load_average_1min"]}


@torch.no_grad()
def references(data_fields: dict) -> dict:
    """Head-free reference scores of the evaluated sets: raw pixels (centred) and a
    randomly initialised CNN (BatchNorm statistics of training images): how hard
    the sets are before any training."""
    data = load_data(data_fields)
    torch.manual_seed(0)
    cnn = build_backbone(RECIPE["backbone"], in_channels=data.train_images.shape[1], image_size=data_fields["image_size"],
                         embedding_size=RECIPE["embedding_size"], width=RECIPE["width"])
    cnn.train()
    for lo in range(0, 4096, 256):
        cnn(data.train_images[lo:lo + 256])
    out = {}
    for name, (images, labels) in data.verification_sets().items():
        pixels = images.flatten(1)
        out[name] = {
            "pixels": verification_report(pixels - pixels.mean(0), labels, RECIPE["eval_pairs"]),
            "random_cnn": verification_report(embed(cnn, images, 512, flip=True), labels, RECIPE["eval_pairs"]),
        }
        out[name] = {k: {m: round(v[m], 4) for m in METRICS} for k, v in out[name].items()}
    return out


def load_data(fields: dict):
    return load_synthetic(fields["synthetic_identities"], fields["synthetic_eval_identities"], fields["image_size"],
                          fields["synthetic_seed"], fields["synthetic_median_images"], fields["synthetic_max_images"])


# --------------------------------------------------------------------------- modes


def common(args) -> dict:
    return dict(progress="none", threads=args.threads, log_every=25, device="cpu")


def diagnostics() -> dict:
    """--diagnose: DCQ with a queue as large as the number of classes, which
    separates the effect of the queue's size (10% of the negatives) from that of
    generating the class weights. Not part of the comparison."""
    return {"dcq_full_queue": dict(head="dcq", eval_model="both", queue_size=DATA["synthetic_identities"],
                                   **DCQ_LEVERS)}


def benchmark(args) -> dict:
    data_fields, recipe = (QUICK_DATA, QUICK_RECIPE) if args.quick else (DATA, RECIPE)
    seeds = args.seeds or ((0,) if args.quick else SEEDS)
    data = load_data(data_fields)
    print(f"synthetic set: {json.dumps(data.summary())}", flush=True)
    chosen = diagnostics() if args.diagnose else variants()
    names = [v for v in chosen if args.variants is None or v in args.variants]
    specs = [{"variant": v, "seed": s, "config": {**data_fields, **recipe, **common(args), **chosen[v], "seed": s}}
             for s in seeds for v in names]
    started = time.perf_counter()
    runs = run_all(specs, args.jobs)
    total = time.perf_counter() - started
    summary = summarise(runs)
    report = {
        "benchmark": "accuracy", "quick": args.quick,
        "settings": {"data": data_fields, "recipe": recipe, "seeds": list(seeds), "dcq_levers": DCQ_LEVERS,
                     "variants": {v: chosen[v] for v in names},
                     "labels": {v: LABELS.get(v, v) for v in names}},
        "dataset": data.summary(),
        "references": references(data_fields),
        "hardware": hardware(args),
        "total_seconds": total,
        "summary": summary,
        "verdicts": verdicts(summary),
        # Every measurement, one row each: head, seed, evaluated model, set, metric.
        "results": [{"variant": r["variant"], "head": r["head"], "seed": r["seed"], "eval_model": model,
                     "set": name, "metric": metric, "value": values[metric]}
                    for r in runs for model, sets in r["evals"].items() for name, values in sets.items()
                    for metric in METRICS],
        "runs": runs,
    }
    stem = "accuracy_quick" if args.quick else ("accuracy_diagnostics" if args.diagnose else "accuracy")
    write_json(os.path.join(args.output, stem + ".json"), report, meta("accuracy.py", args.argv))
    print(table(summary))
    print(time_table(summary))
    print(json.dumps(report["verdicts"], indent=2))
    if args.diagnose:
        print(f"wrote {os.path.join(args.output, stem + '.json')} in {total:.0f}s of training runs")
        return report
    s = data.summary()
    title = (f"synthetic long-tailed set: {s['identities']} identities ({100 * s['images_per_identity']['fraction_under_10']:.0f}%"
             f" < 10 images), {s['train_images']} images; {specs[0]['config'].get('steps') or recipe['epochs']} "
             f"{'steps' if specs[0]['config'].get('steps') else 'epochs'}, {len(seeds)} seed(s); mean ± std")
    if plot(summary, os.path.join(args.output, stem + ".png"), title):
        print(f"wrote {os.path.join(args.output, stem + '.png')}")
    print(f"wrote {os.path.join(args.output, stem + '.json')} in {total:.0f}s of training runs")
    return report


def calibrate(args) -> dict:
    """Choose DCQ's levers on the calibration set, in two stages: the momentum
    schedule (warm-up "empty"), then the queue warm-up (with the chosen schedule)."""
    bench_data, data = load_data(DATA), load_data(CALIBRATION_DATA)
    batch = RECIPE["batch_size"]
    bench_epoch, calib_epoch = bench_data.train_labels.numel() // batch, data.train_labels.numel() // batch
    recipe = dict(RECIPE, steps=math.ceil(RECIPE["epochs"] * bench_epoch),
                  warmup_epochs=RECIPE["warmup_epochs"] * bench_epoch / calib_epoch)
    seeds = args.seeds or CALIBRATION_SEEDS
    print(f"calibration set: {json.dumps(data.summary())}; {recipe['steps']} steps", flush=True)
    base = {**CALIBRATION_DATA, **recipe, **common(args), "log_every": 1, "head": "dcq", "eval_model": "both"}
    started = time.perf_counter()

    def stage(candidates: dict) -> tuple[list[dict], dict]:
        specs = [{"variant": name, "seed": s, "config": {**base, **fields, "seed": s}}
                 for s in seeds for name, fields in candidates.items()]
        runs = run_all(specs, args.jobs)
        scores = {name: sum(score(r) for r in runs if r["variant"] == name) / len(seeds) for name in candidates}
        return runs, scores

    momentum_runs, momentum_scores = stage({k: {**v, "queue_warmup": "empty"} for k, v in MOMENTUM_CANDIDATES.items()})
    momentum = choose(momentum_scores, "constant_0.99")
    warmup_candidates = {f"warmup_{w}": {**MOMENTUM_CANDIDATES[momentum], "queue_warmup": w}
                         for w in WARMUP_CANDIDATES if w != "empty"}
    warmup_runs, warmup_scores = stage(warmup_candidates)
    warmup_scores["warmup_empty"] = momentum_scores[momentum]  # measured in the first stage
    warmup = choose(warmup_scores, "warmup_empty")
    chosen = {**dict(momentum=0.99, momentum_end=0.999), **MOMENTUM_CANDIDATES[momentum],
              "queue_warmup": warmup.removeprefix("warmup_")}
    runs = momentum_runs + warmup_runs
    summary = summarise(runs)
    report = {
        "benchmark": "accuracy_calibration",
        "rule": (f"score = heldout TAR@FAR=1e-3, mean of the backbone and generator evaluations and of the seeds; "
                 f"stage 1 picks the momentum schedule (queue warm-up 'empty'), stage 2 the queue warm-up (with the "
                 f"stage-1 schedule); a candidate replaces the incumbent (constant 0.99, 'empty') only if it scores "
                 f">= {MIN_GAIN_POINTS} points higher"),
        "settings": {"data": CALIBRATION_DATA, "recipe": recipe, "seeds": list(seeds)},
        "dataset": data.summary(),
        "hardware": hardware(args),
        "total_seconds": time.perf_counter() - started,
        "momentum_scores": momentum_scores, "momentum_choice": momentum,
        "warmup_scores": warmup_scores, "warmup_choice": warmup,
        "chosen_levers": chosen,
        "summary": summary,
        "runs": runs,
    }
    write_json(os.path.join(args.output, "accuracy_calibration.json"), report, meta("accuracy.py", args.argv))
    print(table(summary, sets=("heldout",)))
    print(json.dumps({k: report[k] for k in ("momentum_scores", "momentum_choice", "warmup_scores", "warmup_choice",
                                             "chosen_levers")}, indent=2))
    print(f"wrote {os.path.join(args.output, 'accuracy_calibration.json')} in {report['total_seconds']:.0f}s")
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a smoke run of every variant (written to accuracy_quick.*)")
    mode.add_argument("--calibrate", action="store_true", help="choose DCQ's levers on the calibration set")
    mode.add_argument("--diagnose", action="store_true",
                      help="DCQ with a queue of 100%% of the classes (written to accuracy_diagnostics.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the mode's)")
    parser.add_argument("--variants", nargs="+", default=None, help="only these variants (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at a time, in separate processes")
    # One thread: on a shared 2-core machine two OpenMP threads that wait for each
    # other ran 2-3x slower than one (measured).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (0: torch's default)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    return calibrate(args) if args.calibrate else benchmark(args)


if __name__ == "__main__":
    main()
