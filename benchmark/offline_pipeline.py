"""The offline end-to-end run: synthetic TL;DR task -> SmolLM2-135M -> SFT -> reward model -> PPO, on CPU.

Every stage is the real script, chained only through the checkpoint folders it saves; this driver picks small
sizes so the whole chain fits a 2-core machine, then writes `report.md` and PNG figures into the run folder,
judged by the offline task's gold judge (`benchmark/tldr_synth.py`):

  * SFT: training loss, validation ROUGE, gold win rates of the base model and of SFT against the reference
    summaries and of SFT against the base model on the same prompts;
  * RM: validation accuracy against the noisy labels and against the noiseless gold preference, next to the
    known ceiling, and its calibration;
  * PPO: curves of RM score, KL, response length and EOS rate against episodes, gold win rates of PPO against
    the references and against SFT, and the learned RM score against the gold score over training (reward
    over-optimisation shows as the two diverging).

    python benchmark/offline_pipeline.py --run_dir runs/offline
    python benchmark/offline_pipeline.py --run_dir runs/offline --stages report     # redo the report only

Stages whose output folder already holds a finished result are skipped, so an interrupted run continues; a stage
cut short is rerun from the start, and moves its unfinished files to <folder>/previous_runs/ first (a stage never
appends to an older run's metrics.jsonl).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import tldr_synth  # noqa: E402

STAGES = ("model", "data", "base", "sft", "rm", "ppo", "report")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", default="runs/offline", help="folder for every stage's output and the report")
    p.add_argument("--data_dir", default="data/tldr_synth", help="where the synthetic task is written")
    p.add_argument("--model_dir", default="models/smollm2-135m", help="where the converted base model is written")
    p.add_argument("--data_seed", type=int, default=0, help="seed of the synthetic corpus")
    p.add_argument("--seed", type=int, default=44413, help="training seed passed to every stage")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    p.add_argument("--eval_samples", type=int, default=32, help="validation prompts evaluated by SFT, RM and PPO")
    p.add_argument("--sft_episodes", type=int, default=128, help="SFT training sequences")
    p.add_argument("--sft_batch", type=int, default=16, help="SFT global batch")
    p.add_argument("--sft_lr", type=float, default=5e-5, help="SFT learning rate (the paper's 3e-6 needs 900 updates)")
    p.add_argument("--rm_episodes", type=int, default=96, help="RM training pairs")
    p.add_argument("--rm_batch", type=int, default=16, help="RM global batch")
    p.add_argument("--rm_lr", type=float, default=3e-5, help="RM learning rate")
    p.add_argument("--rm_eval_samples", type=int, default=100, help="RM validation pairs")
    p.add_argument("--ppo_episodes", type=int, default=32, help="PPO episodes (rollouts)")
    p.add_argument("--ppo_batch", type=int, default=8, help="PPO rollouts per update (micro-batch 1 keeps memory < 8 GiB)")
    p.add_argument("--ppo_lr", type=float, default=1e-5, help="PPO learning rate")
    p.add_argument("--ppo_kl_coef", type=float, default=0.05, help="PPO KL coefficient (paper 0.05)")
    return p.parse_args(argv)


def run_stage(name: str, cmd: list[str], run_dir: str) -> float:
    """Run one stage, streaming its output to the console and to `<run_dir>/<name>.log`; return wall seconds."""
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(os.path.join(run_dir, f"{name}.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if "it/s" not in line and "s/it" not in line:  # keep progress bars in the log only
                sys.stdout.write(line)
        if proc.wait():
            raise SystemExit(f"stage {name} failed (exit {proc.returncode}); see {run_dir}/{name}.log")
    return time.time() - start


def done(folder: str, marker: str) -> bool:
    return os.path.exists(os.path.join(folder, marker))


# ---------------------------------------------------------------------------------------------------------
# Judging and report helpers (pure functions; tests import them)
# ---------------------------------------------------------------------------------------------------------


def win_rate(scores_a: list[float], scores_b: list[float]) -> tuple[float, float]:
    """Share of pairs where a beats b (ties count 1/2) and the half-width of its 95% normal interval."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)]
    mean = sum(wins) / len(wins)
    var = sum((w - mean) ** 2 for w in wins) / max(len(wins) - 1, 1)
    return mean, 1.96 * math.sqrt(var / len(wins))


def gold_scores(table: list[dict], examples: dict[str, dict], column: str) -> list[float]:
    """Gold score of `column` for each table row, looked up by the row's id."""
    missing = [row["id"] for row in table if row["id"] not in examples]
    if missing:
        raise ValueError(f"{len(missing)} table ids are not in the dataset, e.g. {missing[:3]}")
    return [tldr_synth.gold_score(examples[row["id"]], str(row[column]) if row[column] == row[column] else "")
            for row in table]


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def fmt(rate: tuple[float, float]) -> str:
    return f"{rate[0]:.3f} ± {rate[1]:.3f}"


def load_csv(path: str) -> list[dict]:
    import pandas as pd

    return pd.read_csv(path, keep_default_na=False).to_dict("records")


def plot_lines(path: str, panels: list[tuple[str, list, dict[str, list]]], xlabel: str) -> None:
    """One row of panels; each panel is (title, x, {label: y})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, x, ys) in zip(axes if len(panels) > 1 else [axes], panels):
        for label, y in ys.items():
            ax.plot(x, y, marker="o", markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(True, linestyle="--", alpha=0.5)
        if len(ys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args, d: dict[str, str], timings: dict[str, float]) -> None:
    """report.md and PNG figures from the stages' metrics files and tables, judged by the gold judge."""
    sft_data = os.path.join(args.data_dir, "sft")
    val = {r["id"]: r for r in tldr_synth.read_jsonl(os.path.join(sft_data, "validation.jsonl"))}
    meta = json.load(open(os.path.join(args.data_dir, "meta.json")))
    lines = ["# Offline end-to-end run", "",
             f"`python benchmark/offline_pipeline.py --run_dir {args.run_dir}`, seed {args.seed}, synthetic corpus "
             f"seed {args.data_seed}, SmolLM2-135M-Instruct on CPU, fp32.", "",
             "| stage | wall time (s) | peak memory (GiB) |", "|---|---|---|"]
    for name, seconds in timings.items():
        peak = ""
        if name in d and os.path.exists(os.path.join(d[name], "metrics.jsonl")):
            peaks = [r["time/peak_memory_gib"] for r in read_metrics(os.path.join(d[name], "metrics.jsonl"))
                     if "time/peak_memory_gib" in r]
            peak = f"{max(peaks):.1f}" if peaks else ""
        lines.append(f"| {name} | {seconds:.0f} | {peak} |")
    lines.append(f"| total | {sum(timings.values()):.0f} | |")

    # ---- SFT
    if os.path.exists(os.path.join(d["sft"], "validation_table.csv")):
        records = read_metrics(os.path.join(d["sft"], "metrics.jsonl"))
        train = [r for r in records if "train/sft/loss" in r]
        evals = {k: v for r in records for k, v in r.items() if k.startswith("validation/")}
        plot_lines(os.path.join(args.run_dir, "sft_loss.png"),
                   [("SFT training loss", [r["samples"] for r in train], {"loss": [r["train/sft/loss"] for r in train]})],
                   "sequences")
        sft_table = load_csv(os.path.join(d["sft"], "validation_table.csv"))
        sft_gold = gold_scores(sft_table, val, "response")
        ref_gold = gold_scores(sft_table, val, "reference")
        lines += ["", "## SFT", "",
                  f"Training loss {train[0]['train/sft/loss']:.3f} -> {train[-1]['train/sft/loss']:.3f} over "
                  f"{train[-1]['samples']} sequences (`sft_loss.png`). Validation ({len(sft_table)} prompts): "
                  + ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in evals.items()) + ".", "",
                  "| gold win rate (95% interval) | |", "|---|---|",
                  f"| SFT vs reference summaries | {fmt(win_rate(sft_gold, ref_gold))} |"]
        if os.path.exists(os.path.join(d["base"], "validation_table.csv")):
            base_table = load_csv(os.path.join(d["base"], "validation_table.csv"))
            base_gold = gold_scores(base_table, val, "response")
            lines += [f"| base model vs reference summaries | {fmt(win_rate(base_gold, ref_gold))} |",
                      f"| SFT vs base model, same prompts | {fmt(win_rate(sft_gold, base_gold))} |"]
        lines.append(f"\nMean gold score: SFT {sum(sft_gold) / len(sft_gold):.3f}, reference "
                     f"{sum(ref_gold) / len(ref_gold):.3f}.")

    # ---- reward model
    rm_csv = os.path.join(d["rm"], "validation_rewards.csv")
    if os.path.exists(rm_csv):
        cmp_rows = tldr_synth.read_jsonl(os.path.join(args.data_dir, "comparisons", "validation.jsonl"))
        infos = {r["info"]["id"]: r["info"] for r in cmp_rows}
        pairs = load_csv(rm_csv)
        rm_right = [p["chosen_rewards"] > p["rejected_rewards"] for p in pairs]
        gold_right = [tldr_synth.gold_prefers(infos[p["id"]], p["chosen"], p["rejected"]) == right
                      for p, right in zip(pairs, rm_right)]
        labels_gold = [tldr_synth.gold_prefers(infos[p["id"]], p["chosen"], p["rejected"]) for p in pairs]
        margins = [tldr_synth.gold_score(infos[p["id"]], p["chosen"]) - tldr_synth.gold_score(infos[p["id"]], p["rejected"])
                   for p in pairs]
        ceiling = tldr_synth.expected_agreement(margins, meta["label_temperature"])
        acc = win_rate([float(x) for x in rm_right], [0.5] * len(rm_right))
        acc_gold = win_rate([float(x) for x in gold_right], [0.5] * len(gold_right))
        lines += ["", "## Reward model", "",
                  f"Validation pairs: {len(pairs)}. Accuracy against the noisy labels {fmt(acc)}; against the "
                  f"noiseless gold preference {fmt(acc_gold)}. The labels agree with the gold preference on "
                  f"{sum(labels_gold) / len(labels_gold):.3f} of these pairs; the expected ceiling of any model "
                  f"against the noisy labels is {ceiling:.3f} (mean of max(p, 1 - p) under the label noise model).",
                  "", "Calibration: `rm/validation_calibration.png`."]

    # ---- PPO
    ppo_metrics = os.path.join(d["ppo"], "metrics.jsonl")
    if os.path.exists(os.path.join(d["ppo"], "validation_table.csv")):
        updates = [r for r in read_metrics(ppo_metrics) if "objective/scores" in r]
        x = [r["episodes"] for r in updates]
        plot_lines(os.path.join(args.run_dir, "ppo_curves.png"), [
            ("RM score", x, {"rollouts (T=0.7)": [r["objective/scores"] for r in updates],
                             "validation probe (T=0.01)": [r["objective/validation_score"] for r in updates]}),
            ("KL to SFT (sum over tokens)", x, {"kl": [r["objective/kl"] for r in updates]}),
            ("response length (tokens)", x, {"length": [r["objective/response_length"] for r in updates]}),
            ("EOS rate", x, {"eos": [r["objective/eos_fraction"] for r in updates]}),
        ], "episodes")
        ppo_table = load_csv(os.path.join(d["ppo"], "validation_table.csv"))
        ppo_gold = gold_scores(ppo_table, val, "response")
        ref_gold_ppo = gold_scores(ppo_table, val, "reference")
        lines += ["", "## PPO", "", f"{len(updates)} updates, {x[-1]} episodes (`ppo_curves.png`). "
                  f"RM score on rollouts {updates[0]['objective/scores']:.3f} -> {updates[-1]['objective/scores']:.3f}, "
                  f"KL {updates[-1]['objective/kl']:.3f}, EOS rate {updates[-1]['objective/eos_fraction']:.2f}, "
                  f"{updates[-1]['time/episodes_per_second']:.3f} episodes/s.", "",
                  "| gold win rate (95% interval) | |", "|---|---|",
                  f"| PPO vs reference summaries | {fmt(win_rate(ppo_gold, ref_gold_ppo))} |"]
        if os.path.exists(os.path.join(d["sft"], "validation_table.csv")):
            sft_by_id = {r["id"]: r for r in load_csv(os.path.join(d["sft"], "validation_table.csv"))}
            common = [r for r in ppo_table if r["id"] in sft_by_id]
            lines.append(f"| PPO vs SFT, same prompts | "
                         f"{fmt(win_rate(gold_scores(common, val, 'response'), gold_scores([sft_by_id[r['id']] for r in common], val, 'response')))} |")
        # learned RM score against the gold score of the probe samples over training: over-optimisation check
        sample_dir = os.path.join(d["ppo"], "samples")
        if os.path.isdir(sample_dir):
            steps, rm_mean, gold_mean = [], [], []
            for name in sorted(os.listdir(sample_dir)):
                table = load_csv(os.path.join(sample_dir, name))
                steps.append(int(name.split("_")[1].split(".")[0]))
                rm_mean.append(sum(r["score"] for r in table) / len(table))
                gold_mean.append(sum(gold_scores(table, val, "response")) / len(table))
            plot_lines(os.path.join(args.run_dir, "rm_vs_gold.png"),
                       [("validation probe: learned RM score", steps, {"RM": rm_mean}),
                        ("validation probe: gold score", steps, {"gold": gold_mean})], "update")
            lines += ["", f"Probe over training (`rm_vs_gold.png`): RM score {rm_mean[0]:.3f} -> {rm_mean[-1]:.3f}, "
                      f"gold score {gold_mean[0]:.3f} -> {gold_mean[-1]:.3f}."]
    path = os.path.join(args.run_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    stages = set(args.stages.split(","))
    unknown = stages - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    os.makedirs(args.run_dir, exist_ok=True)
    py = sys.executable
    sft_data, cmp_data = os.path.join(args.data_dir, "sft"), os.path.join(args.data_dir, "comparisons")
    d = {k: os.path.join(args.run_dir, k) for k in ("base", "sft", "rm", "ppo")}
    timings_path = os.path.join(args.run_dir, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    common = ["--seed", str(args.seed), "--max_eval_samples", str(args.eval_samples)]

    def stage(name, cmd, folder, marker):
        if name in stages and not done(folder, marker):
            timings[name] = run_stage(name, cmd, args.run_dir)
            with open(timings_path, "w") as f:
                json.dump(timings, f, indent=2)

    stage("model", [py, "benchmark/convert_smollm2.py", "--output_dir", args.model_dir], args.model_dir,
          "model.safetensors")
    # the corpus, with its statistics (token lengths under the SmolLM2 tokenizer, judge sanity, label agreement)
    stage("data", [py, "benchmark/tldr_synth.py", "--out_dir", args.data_dir, "--seed", str(args.data_seed),
                   "--stats", "--tokenizer", args.model_dir], args.data_dir, "meta.json")
    # the untrained model on the same prompts: the baseline of the SFT win rate
    stage("base", [py, "sft_tldr.py", "--base_model", args.model_dir, "--dataset", sft_data, "--output_dir",
                   d["base"], "--total_episodes", "0", "--eval_splits", "validation", *common],
          d["base"], "validation_table.csv")
    stage("sft", [py, "sft_tldr.py", "--base_model", args.model_dir, "--dataset", sft_data, "--output_dir", d["sft"],
                  "--total_episodes", str(args.sft_episodes), "--batch_size", str(args.sft_batch),
                  "--learning_rate", str(args.sft_lr), "--eval_splits", "validation", *common],
          d["sft"], "model.safetensors")
    stage("rm", [py, "reward_tldr.py", "--sft_model_path", d["sft"], "--dataset", cmp_data, "--sft_dataset", sft_data,
                 "--output_dir", d["rm"], "--total_episodes", str(args.rm_episodes), "--batch_size",
                 str(args.rm_batch), "--learning_rate", str(args.rm_lr), "--seed", str(args.seed),
                 "--max_eval_samples", str(args.rm_eval_samples), "--normalization_samples", "32"],
          d["rm"], "model.safetensors")
    stage("ppo", [py, "ppo_tldr.py", "--sft_model_path", d["sft"], "--reward_model_path", d["rm"], "--dataset",
                  sft_data, "--output_dir", d["ppo"], "--total_episodes", str(args.ppo_episodes), "--batch_size",
                  str(args.ppo_batch), "--local_micro_batch_size", "1",
                  "--local_rollout_forward_batch_size", str(args.ppo_batch), "--learning_rate", str(args.ppo_lr),
                  "--kl_coef", str(args.ppo_kl_coef), "--eval_splits", "validation", "--sample_every", "1", *common],
          d["ppo"], "model.safetensors")
    if "report" in stages:
        write_report(args, d, timings)


if __name__ == "__main__":
    main()
