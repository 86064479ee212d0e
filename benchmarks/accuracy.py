"""Accuracy benchmark: DCQ (queue = 10% of the classes) against full softmax and
Partial FC (sample rate 10%) on the synthetic long-tailed identity set.

Same backbone, data, budget (steps, batch size, schedule) and seeds for every
head; only the classification head differs. Reported per head (mean and
standard deviation over the seeds):

- "heldout": identities never seen in training (open-set verification, the
  overall score): 10-fold accuracy (LFW protocol) and TAR at FAR 1e-3 / 1e-4;
- "tail": fresh images of training identities with <= 3 training images;
- "head": fresh images of training identities with >= 12 training images.

Writes benchmarks/results/accuracy.json (settings, every run, the summary) and
accuracy.png, and prints a table. ``--quick`` is a smoke run of about a
minute (written to accuracy_quick.*, so it never overwrites the real results).

    python benchmarks/accuracy.py            # the committed results
    python benchmarks/accuracy.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dcq_ops.training.loop import TrainConfig, _synthetic, train  # noqa: E402

HEADS = ("dcq", "softmax", "partial_fc")
# An ablation, not part of the comparison: DCQ with a queue as large as the
# number of classes separates the effect of the queue's size (10% of the
# negatives) from that of generating the class weights.
ABLATION = "dcq_full_queue"
LABELS = {"dcq": "DCQ (queue 10%)", "softmax": "full softmax", "partial_fc": "Partial FC (10%)",
          ABLATION: "ablation: DCQ, queue 100%"}
SETS = ("heldout", "tail", "head")
METRICS = ("accuracy", "tar@far=0.001", "tar@far=0.0001")
METRIC_LABELS = {"accuracy": "10-fold accuracy", "tar@far=0.001": "TAR @ FAR 1e-3", "tar@far=0.0001": "TAR @ FAR 1e-4"}


def settings(args) -> dict:
    """The shared TrainConfig fields of every run (the head and seed vary)."""
    if args.quick:
        base = dict(synthetic_identities=800, synthetic_eval_identities=100, image_size=16, width=8,
                    embedding_size=64, batch_size=64, steps=80, warmup_epochs=0.5, eval_pairs=2000)
    else:
        base = dict(synthetic_identities=args.identities, synthetic_eval_identities=400, image_size=32,
                    width=args.width, embedding_size=128, batch_size=args.batch_size, epochs=args.epochs,
                    warmup_epochs=1.0, eval_pairs=6000)
    return dict(base, sample_rate=0.1, momentum=args.momentum, optimizer="sgd", lr=args.lr, schedule="cosine",
                margin="cosface", scale=args.scale, margin_value=0.3, progress="none", log_every=25,
                threads=args.threads)


def variants_of(runs: list[dict]) -> list[str]:
    return [v for v in (*HEADS, ABLATION) if any(r["variant"] == v for r in runs)]


def summarise(runs: list[dict]) -> dict:
    out = {}
    for head in variants_of(runs):
        mine = [r for r in runs if r["variant"] == head]
        out[head] = {}
        for name in SETS:
            out[head][name] = {}
            for metric in METRICS:
                values = torch.tensor([r["final_eval"][name][metric] for r in mine], dtype=torch.float64)
                out[head][name][metric] = {"mean": float(values.mean()),
                                           "std": float(values.std()) if len(values) > 1 else 0.0,
                                           "values": values.tolist()}
        out[head]["train_seconds"] = sum(r["elapsed_s"] for r in mine) / len(mine)
        out[head]["samples_per_s"] = sum(r["samples_per_s"] for r in mine) / len(mine)
    return out


def claims(summary: dict) -> dict:
    """The paper's claim in miniature, as measured (differences in points, i.e. x100)."""
    def mean(head, name, metric):
        return summary[head][name][metric]["mean"]
    result = {}
    for metric in METRICS:
        overall = 100 * (mean("dcq", "heldout", metric) - mean("softmax", "heldout", metric))
        tail_vs = {other: 100 * (mean("dcq", "tail", metric) - mean(other, "tail", metric))
                   for other in ("softmax", "partial_fc")}
        result[metric] = {"dcq_minus_softmax_overall_points": round(overall, 3),
                          "dcq_within_half_point_of_softmax_overall": overall >= -0.5,
                          "dcq_minus_softmax_tail_points": round(tail_vs["softmax"], 3),
                          "dcq_minus_partial_fc_tail_points": round(tail_vs["partial_fc"], 3),
                          "dcq_better_than_both_on_tail": all(v > 0 for v in tail_vs.values()),
                          # Within each head: how far its tail score falls below its head-class score.
                          "tail_minus_head_points": {h: round(100 * (mean(h, "tail", metric) - mean(h, "head", metric)), 3)
                                                     for h in summary}}
    return result


def table(summary: dict) -> str:
    lines = ["| head | set | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for head in summary:
        for name in SETS:
            cells = []
            for metric in METRICS:
                s = summary[head][name][metric]
                cells.append(f"{100 * s['mean']:.2f}" + (f" ± {100 * s['std']:.2f}" if len(s["values"]) > 1 else ""))
            lines.append(f"| {LABELS[head]} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (`pip install matplotlib`, or the `bench` extra): no plot written",
              file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    heads = list(summary)
    width = 0.8 / len(heads)
    for ax, metric in zip(axes, METRICS):
        for k, head in enumerate(heads):
            means = [100 * summary[head][name][metric]["mean"] for name in SETS]
            stds = [100 * summary[head][name][metric]["std"] for name in SETS]
            positions = [i + (k - (len(heads) - 1) / 2) * width for i in range(len(SETS))]
            ax.bar(positions, means, width, yerr=stds if any(stds) else None, capsize=3, label=LABELS[head],
                   hatch="//" if head == ABLATION else None, alpha=0.6 if head == ABLATION else 1.0)
        ax.set_xticks(range(len(SETS)))
        ax.set_xticklabels(["held-out ids\n(overall)", "tail ids\n(<= 3 images)", "head ids\n(>= 12 images)"])
        ax.set_title(METRIC_LABELS[metric])
        ax.set_ylabel("%")
        lows = [100 * summary[h][n][metric]["mean"] for h in heads for n in SETS]
        ax.set_ylim(max(0.0, min(lows) - 10), min(100.0, max(lows) + 5))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run (written to accuracy_quick.*)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (the data set is fixed)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data set")
    parser.add_argument("--identities", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=4.0, help="the training budget of every head")
    parser.add_argument("--ablation", type=int, choices=(0, 1), default=1,
                        help="also train DCQ with a queue of 100%% of the classes (1) or not (0)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--scale", type=float, default=32.0)
    parser.add_argument("--momentum", type=float, default=0.99, help="the weight generator's EMA momentum")
    # One thread: on a shared 2-core machine two OpenMP threads that wait for each
    # other ran 2-3x slower than one (measured); 0 = torch's default.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    shared = settings(args)
    stem = "accuracy_quick" if args.quick else "accuracy"
    os.makedirs(args.output, exist_ok=True)

    data = _synthetic(shared["synthetic_identities"], shared["synthetic_eval_identities"], shared["image_size"],
                      args.data_seed)
    print(f"synthetic set: {json.dumps(data.summary())}", flush=True)
    runs = []
    started = time.perf_counter()
    for seed in args.seeds:
        for variant in (*HEADS, ABLATION) if args.ablation else HEADS:
            head = "dcq" if variant == ABLATION else variant
            extra = {"queue_size": data.num_classes} if variant == ABLATION else {}
            config = TrainConfig(**shared, **extra, head=head, seed=seed, synthetic_seed=args.data_seed)
            t0 = time.perf_counter()
            result = train(config)
            trainer = result.pop("trainer")
            history = result["history"]
            run = {"variant": variant, "head": head, "seed": seed, "steps": result["steps"], "elapsed_s": time.perf_counter() - t0,
                   "samples_per_s": sum(h["samples_per_s"] for h in history) / len(history),
                   "final_loss": history[-1]["loss"], "final_eval": result["final_eval"],
                   "loss_curve": [(h["step"], round(h["loss"], 4)) for h in history]}
            if head == "dcq":
                run["queue_size"] = trainer.head.loss.queue.size
            elif head == "partial_fc":
                run["classes_sampled"] = trainer.head.num_sample
            runs.append(run)
            e = result["final_eval"]
            print(f"seed {seed} {variant:14s} {run['elapsed_s']:6.1f}s loss {run['final_loss']:.3f} | " + " | ".join(
                f"{name} acc {100 * e[name]['accuracy']:.2f} TAR@1e-3 {100 * e[name]['tar@far=0.001']:.2f}"
                for name in SETS), flush=True)

    summary = summarise(runs)
    report = {
        "benchmark": "accuracy", "quick": args.quick,
        "settings": {**shared, "seeds": args.seeds, "data_seed": args.data_seed, "heads": list(HEADS),
                     "ablation": LABELS[ABLATION] if args.ablation else None,
                     "head_settings": {"dcq": "queue = ceil(0.1 * classes), weight generator EMA momentum "
                                              f"{args.momentum}", "softmax": "normalised FC over every class",
                                       "partial_fc": "batch positives + random classes, ceil(0.1 * classes) in all"}},
        "dataset": data.summary(),
        "hardware": {"machine": platform.machine(), "processor": cpu_model(),
                     "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                     "python": platform.python_version(), "device": "cpu"},
        "total_seconds": time.perf_counter() - started,
        "summary": summary,
        "claims": claims(summary),
        "runs": runs,
    }
    with open(os.path.join(args.output, stem + ".json"), "w") as f:
        json.dump(report, f, indent=2)
    text = table(summary)
    print(text)
    print(json.dumps(report["claims"], indent=2))
    title = (f"synthetic long-tailed set: {data.summary()['identities']} identities, "
             f"{data.summary()['train_images']} images; {shared.get('steps') or shared['epochs']} "
             f"{'steps' if shared.get('steps') else 'epochs'}, {len(args.seeds)} seed(s); mean ± std")
    if plot(summary, os.path.join(args.output, stem + ".png"), title):
        print(f"wrote {os.path.join(args.output, stem + '.png')}")
    print(f"wrote {os.path.join(args.output, stem + '.json')} in {report['total_seconds']:.0f}s")
    return report


if __name__ == "__main__":
    main()
