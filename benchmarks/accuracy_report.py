"""The summaries of benchmarks/accuracy.py: the per-variant means and spreads over the
seeds, the differences behind the verdicts, the tables and the plot. accuracy.py holds
the fixed settings and the runs."""

from __future__ import annotations

import math

import torch

from common import pyplot

SETS = ("heldout", "tail", "head")
METRICS = ("accuracy", "tar@far=0.001", "tar@far=0.0001")
METRIC_LABELS = {"accuracy": "10-fold accuracy", "tar@far=0.001": "TAR @ FAR 1e-3", "tar@far=0.0001": "TAR @ FAR 1e-4"}
# Shown names; accuracy.variants() adds the ablations' (the same dict object).
LABELS = {"dcq": "DCQ (queue 10%)", "partial_fc": "Partial FC (10%)", "softmax": "full softmax",
          "dcq_full_queue": "diagnostic: DCQ, queue 100%"}


def entries(runs: list[dict]) -> list[tuple[str, str]]:
    """(variant, evaluation model) pairs present, in table order."""
    order = list(dict.fromkeys(r["variant"] for r in runs))
    return [(v, m) for v in order for m in ("backbone", "generator")
            if any(r["variant"] == v and m in r["evals"] for r in runs)]


def entry_label(variant: str, model: str) -> str:
    label = LABELS.get(variant, variant)
    return f"{label} [generator]" if model == "generator" else (f"{label} [backbone]" if variant.startswith("dcq")
                                                                 else label)


def summarise(runs: list[dict]) -> dict:
    """{"variant/model": {set: {metric: {mean, std, values}}, train_seconds, samples_per_s}}."""
    out = {}
    for variant, model in entries(runs):
        mine = [r for r in runs if r["variant"] == variant and model in r["evals"]]
        entry = {"variant": variant, "model": model, "seeds": [r["seed"] for r in mine]}
        for name in SETS:
            entry[name] = {}
            for metric in METRICS:
                values = torch.tensor([r["evals"][model][name][metric] for r in mine], dtype=torch.float64)
                entry[name][metric] = {"mean": float(values.mean()),
                                       "std": float(values.std()) if len(values) > 1 else 0.0,
                                       "values": values.tolist()}
        entry["train_seconds"] = sum(r["train_seconds"] for r in mine) / len(mine)
        entry["samples_per_s"] = sum(r["samples_per_s"] for r in mine) / len(mine)
        out[f"{variant}/{model}"] = entry
    return out


def difference(summary: dict, a: str, b: str, name: str, metric: str) -> dict:
    """a - b in points (x100), with the standard error of that difference over the seeds."""
    sa, sb = summary[a][name][metric], summary[b][name][metric]
    na, nb = len(sa["values"]), len(sb["values"])
    se = math.sqrt(sa["std"] ** 2 / na + sb["std"] ** 2 / nb)
    return {"points": round(100 * (sa["mean"] - sb["mean"]), 3), "se_points": round(100 * se, 3)}


def verdicts(summary: dict) -> dict:
    """The issue's goals and the paper's two claims, measured, for each DCQ evaluation model."""
    out = {}
    for model in ("backbone", "generator"):
        dcq = f"dcq/{model}"
        if dcq not in summary or "partial_fc/backbone" not in summary or "softmax/backbone" not in summary:
            continue
        pfc, sm = "partial_fc/backbone", "softmax/backbone"
        d = {metric: {"heldout_vs_partial_fc": difference(summary, dcq, pfc, "heldout", metric),
                      "heldout_vs_softmax": difference(summary, dcq, sm, "heldout", metric),
                      "tail_vs_partial_fc": difference(summary, dcq, pfc, "tail", metric),
                      "tail_vs_softmax": difference(summary, dcq, sm, "tail", metric),
                      "tail_minus_head": {e: round(100 * (summary[e]["tail"][metric]["mean"]
                                                          - summary[e]["head"][metric]["mean"]), 3)
                                          for e in (dcq, pfc, sm)}}
             for metric in METRICS}
        t3 = d["tar@far=0.001"]
        out[model] = {
            "differences_points": d,
            "goals": {
                "heldout_tar1e-3_within_1_point_of_partial_fc": t3["heldout_vs_partial_fc"]["points"] >= -1.0,
                "heldout_tar1e-3_within_2_points_of_softmax": t3["heldout_vs_softmax"]["points"] >= -2.0,
                "tail_tar1e-3_at_or_above_partial_fc": t3["tail_vs_partial_fc"]["points"] >= 0.0,
            },
            "claims": {
                # "A queue of 10% of the classes matches using every class": within
                # half a point of the full softmax on held-out identities.
                "queue_10pct_matches_full_softmax_heldout_tar1e-3": t3["heldout_vs_softmax"]["points"] >= -0.5,
                # "DCQ helps tail identities": above both baselines on the tail set.
                "better_than_both_on_tail_tar1e-3": (t3["tail_vs_partial_fc"]["points"] > 0
                                                      and t3["tail_vs_softmax"]["points"] > 0),
            },
        }
    return out


def table(summary: dict, sets=SETS) -> str:
    lines = ["| head [evaluated model] | set | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for key, entry in summary.items():
        for name in sets:
            cells = []
            for metric in METRICS:
                s = entry[name][metric]
                cells.append(f"{100 * s['mean']:.2f}" + (f" ± {100 * s['std']:.2f}" if len(s["values"]) > 1 else ""))
            lines.append(f"| {entry_label(entry['variant'], entry['model'])} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(summary: dict) -> str:
    lines = ["| head | training time per run (s) | samples/s |", "|---|---|---|"]
    for entry in summary.values():
        if entry["model"] == "backbone":
            lines.append(f"| {LABELS.get(entry['variant'], entry['variant'])} | {entry['train_seconds']:.0f} | "
                         f"{entry['samples_per_s']:.0f} |")
    return "\n".join(lines)


def plot(summary: dict, path: str, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    keys = [k for k in summary if not summary[k]["variant"].startswith("dcq_")]  # the comparison, no ablations
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4.2))
    width = 0.8 / len(keys)
    for ax, metric in zip(axes, METRICS):
        for k, key in enumerate(keys):
            entry = summary[key]
            means = [100 * entry[name][metric]["mean"] for name in SETS]
            stds = [100 * entry[name][metric]["std"] for name in SETS]
            positions = [i + (k - (len(keys) - 1) / 2) * width for i in range(len(SETS))]
            ax.bar(positions, means, width, yerr=stds if any(stds) else None, capsize=3,
                   label=entry_label(entry["variant"], entry["model"]),
                   hatch="//" if entry["model"] == "generator" else None)
        ax.set_xticks(range(len(SETS)))
        ax.set_xticklabels(["held-out ids\n(overall)", "tail ids\n(<= 3 images)", "head ids\n(>= 12 images)"])
        ax.set_title(METRIC_LABELS[metric])
        ax.set_ylabel("%")
        lows = [100 * summary[k][n][metric]["mean"] for k in keys for n in SETS]
        ax.set_ylim(max(0.0, min(lows) - 10), min(100.0, max(lows) + 5))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
