"""The paper's figures from the output folders of many runs [N+ 1.F, 4, 5].

Each run folder is a stage's `--output_dir` with `run_info.json` (its resolved args) and `metrics.jsonl`; the stage
is told by its args (sft_tldr.py: base_model; reward_tldr.py: sft_model_path; ppo_tldr.py: reward_model_path), the
seed by `args.seed`, and the model size by the base model's name ("pythia-1b-deduped" -> 1B, "smollm2-135m" ->
135M), following sft_model_path back to the SFT run's base model when that folder exists. `--size_map` names sizes
the name does not show.

Figures (PNG, in --out_dir), as the reference's eval/*.py draw them:
  rm_accuracy_vs_size.png      RM accuracy on validation (and validation_cnndm), mean ± std over seeds, log x
                               (eval/rm/{split}/accuracy) [N+ 1.F.2]
  rouge_vs_size.png            SFT ROUGE-L on validation, mean ± std over seeds (validation/sft/rouge/rougeL)
                               [N+ 1.F.1]
  win_rate_vs_size.png         win rate against the reference summaries, one point per seed, per stage, and the
                               0.5 line of the references [N+ 1.F.5]
  win_rate_vs_length.png       the same win rates against the mean response length (tokens with a tokenizer,
                               else words) [N+ 1.F.5]
  rm_calibration.png           RM accuracy per |margin| bin against sigmoid(margin), mean ± std over seeds
                               ({split}_calibration.csv of reward_tldr.py) [N+ 1.F.3]
  ppo_curves.png               objective/scores, objective/kl and objective/response_length against episodes,
                               mean ± std over seeds per size
and summary.csv (mean, std, n per metric, stage and size) and runs.csv (one row per run).

Win rates come from `{split}_table_judged.csv` next to each table (written by benchmark/paper/judge.py, column
`preferred`); or `--win_column COL` reads COL of `{split}_table.csv` (labels ours/reference/invalid, or numbers: 1 a
win, 0 a loss, 0.5 a tie: e.g. a gold judge's verdict in the offline task); or `--win_scores A,B` counts rows where
column A beats column B (e.g. `score,reference_score`: the reward model as the judge).

    python benchmark/paper/plot_paper.py models --out_dir runs/paper_figures                   # every run under models/
    python benchmark/paper/plot_paper.py "runs/offline_*/*" --win_scores score,reference_score --size_map smollm2=135e6
    python benchmark/paper/plot_paper.py models/pythia-1b/*_44413 models/pythia-1b/*_55513 --smooth 20
"""

import argparse
import functools
import glob
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import judge  # noqa: E402  (win_rate_summary: the same win-rate rule as the judge)

STAGES = ("sft", "reward", "ppo")
STAGE_NAMES = {"base": "base model", "sft": "SFT", "reward": "RM", "ppo": "PPO"}
RM_SPLITS = ("validation", "validation_cnndm")
ROUGE_KEY = "validation/sft/rouge/rougeL"
PPO_CURVES = (("objective/scores", "RM score"), ("objective/kl", "KL to SFT (sum over tokens)"),
              ("objective/response_length", "response length (tokens)"))


@dataclass
class Run:
    path: str
    stage: str  # base | sft | reward | ppo (base: an SFT-stage evaluation of the untrained model)
    model: str  # the base model's name or folder
    size: float  # parameters
    seed: int
    records: list = field(default_factory=list, repr=False)  # metrics.jsonl lines


# ---------------------------------------------------------------------------------------------------------
# Pure helpers (tests import them)
# ---------------------------------------------------------------------------------------------------------


def parse_model_size(name: str, size_map: Optional[dict[str, float]] = None) -> Optional[float]:
    """Parameters from a model name or path: "EleutherAI/pythia-2.8b-deduped" -> 2.8e9, "smollm2-135m" -> 1.35e8.

    `size_map` entries {substring: parameters} win over the name (case-insensitive); None when nothing matches."""
    for key, params in (size_map or {}).items():
        if key.lower() in name.lower():
            return float(params)
    found = re.findall(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)([mb])(?![a-z0-9])", name.lower())
    if not found:
        return None
    number, unit = found[-1]  # the innermost folder's size wins in a path
    return float(number) * (1e9 if unit == "b" else 1e6)


def size_label(params: float) -> str:
    """1e9 -> "1B", 2.8e9 -> "2.8B", 1.35e8 -> "135M"."""
    if params >= 1e9:
        return f"{params / 1e9:g}B"
    return f"{params / 1e6:g}M"


def aggregate(points: list[tuple[float, int, float]]):
    """Mean, sample std (ddof 1; 0 for one seed) and count of `value` per size from (size, seed, value) points,
    sorted by size. NaN values (a metric a run did not log) are left out."""
    import pandas as pd

    df = pd.DataFrame(points, columns=["size", "seed", "value"]).dropna(subset=["value"])
    g = df.groupby("size")["value"]
    out = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1).fillna(0.0), "n": g.size()}).reset_index()
    return out.sort_values("size").reset_index(drop=True)


def mean_std_curves(curves: dict[int, list[tuple[float, float]]], smooth: int = 1):
    """Mean ± std over seeds of per-seed curves {seed: [(x, y), ...]} at every x; `smooth` > 1 first takes a
    trailing rolling mean of each seed's curve. Returns a DataFrame x, mean, std, n (seeds present at x)."""
    import pandas as pd

    series = {}
    for seed, xy in curves.items():
        s = pd.Series([y for _, y in xy], index=[x for x, _ in xy], dtype=float).groupby(level=0).last().sort_index()
        series[seed] = s.rolling(smooth, min_periods=1).mean() if smooth > 1 else s
    wide = pd.DataFrame(series)
    return pd.DataFrame({"x": wide.index, "mean": wide.mean(axis=1).values,
                         "std": wide.std(axis=1, ddof=1).fillna(0.0).values, "n": wide.count(axis=1).values})


def win_rate_from_values(values) -> tuple[float, int]:
    """(win rate, rows counted) from judge labels (ours / reference / invalid, invalid left out) or numbers
    (1 win, 0 loss, 0.5 tie; NaN left out)."""
    values = list(values)
    if values and all(isinstance(v, str) for v in values) and set(values) <= {"ours", "reference", "invalid", ""}:
        s = judge.win_rate_summary([v or "invalid" for v in values])
        return s["win_rate"], s["n_valid"]
    numbers = [float(v) for v in values if v == v and v != ""]
    return (sum(numbers) / len(numbers) if numbers else math.nan), len(numbers)


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl lines; a torn last line (a run killed mid-write) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def last_value(records: list[dict], key: str) -> float:
    """The last logged value of `key` (the final evaluation), NaN if never logged."""
    for record in reversed(records):
        if key in record:
            return float(record[key])
    return math.nan


def stage_of(args: dict) -> str:
    if "reward_model_path" in args:
        return "ppo"
    if "sft_model_path" in args:
        return "reward"
    if "base_model" in args:
        return "base" if args.get("total_episodes") == 0 else "sft"
    raise ValueError(f"cannot tell the stage from args {sorted(args)}")


# ---------------------------------------------------------------------------------------------------------
# Loading runs
# ---------------------------------------------------------------------------------------------------------


def find_run_folders(patterns: list[str]) -> list[str]:
    """Folders with run_info.json matched by the patterns (globs allowed); a folder without one is searched below
    (checkpoint folders and the older runs a fresh start moved to previous_runs/ skipped)."""
    folders = []
    for pattern in patterns:
        for match in sorted(glob.glob(pattern)) or [pattern]:
            if os.path.exists(os.path.join(match, "run_info.json")):
                folders.append(match)
            elif os.path.isdir(match):
                for dirpath, dirnames, filenames in os.walk(match):
                    dirnames[:] = sorted(d for d in dirnames if d not in ("checkpoints", "previous_runs"))
                    if "run_info.json" in filenames:
                        folders.append(dirpath)
    return list(dict.fromkeys(os.path.normpath(f) for f in folders))


def base_model_of(name: str, depth: int = 0, cwd: Optional[str] = None) -> str:
    """Follow a checkpoint folder back to the base model its SFT run started from (via run_info.json). A relative
    path is tried against `cwd` (the folder the run that named it was started in), then here, then the repo."""
    for folder in ([os.path.join(cwd, name)] if cwd else []) + [name, os.path.join(ROOT, name)]:
        info_path = os.path.join(folder, "run_info.json")
        if depth < 4 and os.path.exists(info_path):
            info = json.load(open(info_path))
            parent = info["args"].get("base_model") or info["args"].get("sft_model_path")
            if parent:
                return base_model_of(parent, depth + 1, info.get("cwd"))
    return name


def load_run(folder: str, size_map: Optional[dict[str, float]] = None) -> Run:
    info = json.load(open(os.path.join(folder, "run_info.json")))
    args = info["args"]
    stage = stage_of(args)
    model = base_model_of(args["base_model"] if stage in ("base", "sft") else args["sft_model_path"], cwd=info.get("cwd"))
    size = parse_model_size(model, size_map) or parse_model_size(folder, size_map)
    if size is None:
        raise ValueError(f"{folder}: cannot tell the model size from {model!r}; pass --size_map NAME=PARAMS")
    metrics = os.path.join(folder, "metrics.jsonl")
    return Run(folder, stage, model, size, int(args["seed"]), read_metrics(metrics) if os.path.exists(metrics) else [])


def response_lengths(texts: list[str], tokenizer=None) -> list[int]:
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    return [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


@functools.lru_cache(maxsize=None)
def load_tokenizer(path: Optional[str]):
    """The tokenizer saved in a folder (every stage saves its own), loaded once per folder; None without one."""
    if not path or not os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def run_win_rate(run: Run, split: str, win_column: Optional[str], win_scores: Optional[tuple[str, str]],
                 tokenizer_path: Optional[str], length_unit: str) -> Optional[dict]:
    """Win rate, rows counted and mean response length of a run's evaluation table; None without a verdict."""
    import pandas as pd

    judged, plain = (os.path.join(run.path, f"{split}_table{s}.csv") for s in ("_judged", ""))
    if win_column or win_scores:
        path = judged if os.path.exists(judged) else plain
    else:
        path = judged
    if not os.path.exists(path):
        return None
    df = pd.read_csv(path, keep_default_na=False, lineterminator="\n")
    if win_scores:
        if not set(win_scores) <= set(df.columns):  # e.g. an SFT table has no reward-model scores
            return None
        a, b = (pd.to_numeric(df[c], errors="coerce") for c in win_scores)
        values = [math.nan if x != x or y != y else 1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    else:
        column = win_column or "preferred"
        if column not in df.columns:
            return None
        values = list(df[column])
    rate, n = win_rate_from_values(values)
    tokenizer = load_tokenizer(tokenizer_path or run.path) if length_unit == "tokens" else None
    lengths = response_lengths([str(t).strip() for t in df["response"]], tokenizer)
    return {"win_rate": rate, "n_judged": n, "mean_length": sum(lengths) / max(len(lengths), 1),
            "length_unit": "tokens" if tokenizer is not None else "words"}


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _size_axis(ax, sizes: list[float]) -> None:
    """Log x-axis labelled with the sizes present; padded so one size still shows."""
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([size_label(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
    ax.set_xlabel("model size (parameters)")
    ax.grid(True, linestyle="--", alpha=0.5)


def plot_errorbars(path: str, series: dict[str, "object"], ylabel: str, title: str) -> Optional[str]:
    """One errorbar line per series {label: aggregate() frame}; None (no file) when there is no data."""
    series = {k: v for k, v in series.items() if len(v)}
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, df in series.items():
        ax.errorbar(df["size"], df["mean"], yerr=df["std"], marker="o", capsize=4, label=label)
    _size_axis(ax, sorted({s for df in series.values() for s in df["size"]}))
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_win_rates(path: str, rows: list[dict], x: str, title: str) -> Optional[str]:
    """One point per run (colour: stage; x: size or length) and the references' 0.5 line."""
    rows = [r for r in rows if r.get("win_rate") == r.get("win_rate") and r.get("win_rate") is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    markers = {"base": "v", "sft": "s", "ppo": "o"}
    for stage in ("base", "sft", "ppo"):
        pts = [r for r in rows if r["stage"] == stage]
        if pts:
            ax.scatter([r[x] for r in pts], [r["win_rate"] for r in pts], marker=markers[stage], s=40, alpha=0.8,
                       label=f"{STAGE_NAMES[stage]} ({len(pts)} runs)")
    ax.axhline(0.5, color="gray", linestyle="--", label="reference summaries")
    if x == "size":
        _size_axis(ax, sorted({r["size"] for r in rows}))
    else:
        ax.set_xlabel(f"mean response length ({rows[0]['length_unit']})")
        ax.grid(True, linestyle="--", alpha=0.5)
        for r in rows:
            ax.annotate(size_label(r["size"]), (r[x], r["win_rate"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set(ylabel="win rate against the reference", ylim=(0, 1), title=title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def calibration_frame(tables: list[tuple[float, int, "object"]], min_pairs: int = 10):
    """Mean ± std over seeds of the accuracy per margin bin, per size, from (size, seed, calibration table) with
    reward_tldr.py's columns margin_mid, pairs, accuracy; bins with fewer than `min_pairs` pairs in a run are
    left out of that run (the reference stops at the 99.5% margin quantile for the same reason)."""
    import pandas as pd

    rows = [(size, seed, mid, acc) for size, seed, t in tables
            for mid, acc, pairs in zip(t["margin_mid"], t["accuracy"], t["pairs"]) if pairs >= min_pairs]
    df = pd.DataFrame(rows, columns=["size", "seed", "margin_mid", "accuracy"])
    g = df.groupby(["size", "margin_mid"])["accuracy"]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1).fillna(0.0), "n": g.size()}).reset_index()


def plot_calibration(path: str, frame) -> Optional[str]:
    import numpy as np

    if not len(frame):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    xs = np.linspace(0, max(float(frame["margin_mid"].max()) + 0.25, 1.0), 200)
    ax.plot(xs, 1 / (1 + np.exp(-xs)), "--", color="gray", label="perfect calibration: sigmoid(margin)")
    for size, df in frame.groupby("size"):
        ax.errorbar(df["margin_mid"], df["mean"], yerr=df["std"], marker="o", capsize=3, label=size_label(size))
    ax.set(xlabel="|r_chosen - r_rejected| (bin middle)", ylabel="accuracy", ylim=(0.3, 1.02),
           title="Reward model calibration (validation)")
    ax.grid(True, linestyle="--", alpha=0.5)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ppo_curves(path: str, runs: list[Run], smooth: int = 1) -> Optional[str]:
    runs = [r for r in runs if r.stage == "ppo" and any("objective/scores" in rec for rec in r.records)]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(PPO_CURVES), figsize=(4.5 * len(PPO_CURVES), 3.6))
    for ax, (key, title) in zip(axes, PPO_CURVES):
        for size in sorted({r.size for r in runs}):
            curves = {r.seed: [(rec["episodes"], rec[key]) for rec in r.records if key in rec and "episodes" in rec]
                      for r in runs if r.size == size}
            df = mean_std_curves({s: c for s, c in curves.items() if c}, smooth)
            if not len(df):
                continue
            line, = ax.plot(df["x"], df["mean"], label=f"{size_label(size)} ({len(curves)} seeds)")
            ax.fill_between(df["x"], df["mean"] - df["std"], df["mean"] + df["std"], color=line.get_color(), alpha=0.2)
        ax.set(title=title, xlabel="episodes")
        ax.grid(True, linestyle="--", alpha=0.5)
        ax.legend(fontsize=8)
    smoothing = f" (rolling mean of {smooth} updates)" if smooth > 1 else ""
    fig.suptitle(f"PPO training, mean ± std over seeds{smoothing}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------------------


def collect(runs: list[Run], split: str = "validation", win_column: Optional[str] = None,
            win_scores: Optional[tuple[str, str]] = None, tokenizer: Optional[str] = None,
            length_unit: str = "tokens") -> list[dict]:
    """One row per run: its stage, size, seed and headline numbers (NaN / None where the run has none)."""
    rows = []
    for run in runs:
        row = {"path": run.path, "stage": run.stage, "model": run.model, "size": run.size,
               "size_label": size_label(run.size), "seed": run.seed}
        if run.stage == "reward":
            for s in RM_SPLITS:
                row[f"rm_accuracy/{s}"] = last_value(run.records, f"eval/rm/{s}/accuracy")
        if run.stage in ("base", "sft"):
            row["rougeL"] = last_value(run.records, ROUGE_KEY)
        if run.stage in ("base", "sft", "ppo"):
            row.update(run_win_rate(run, split, win_column, win_scores, tokenizer, length_unit) or {})
        rows.append(row)
    seen = {}
    for row in rows:
        key = (row["stage"], row["size"], row["seed"])
        if key in seen:
            warnings.warn(f"two {row['stage']} runs of size {row['size_label']} and seed {row['seed']}: "
                          f"{seen[key]} and {row['path']}; both enter the statistics")
        seen[key] = row["path"]
    return rows


def summarize(rows: list[dict]):
    """mean / std / n per (metric, stage, size) over seeds: the numbers the figures show."""
    import pandas as pd

    out = []
    metrics = [(f"rm_accuracy/{s}", "reward") for s in RM_SPLITS] + [("rougeL", "sft"), ("rougeL", "base")] + \
              [("win_rate", s) for s in ("base", "sft", "ppo")] + [("mean_length", s) for s in ("base", "sft", "ppo")]
    for metric, stage in metrics:
        points = [(r["size"], r["seed"], r.get(metric, math.nan)) for r in rows if r["stage"] == stage]
        agg = aggregate(points)
        for rec in agg.to_dict("records"):
            out.append({"metric": metric, "stage": stage, "size_label": size_label(rec["size"]), **rec})
    return pd.DataFrame(out, columns=["metric", "stage", "size_label", "size", "mean", "std", "n"])


def make_figures(runs: list[Run], out_dir: str, split: str = "validation", win_column: Optional[str] = None,
                 win_scores: Optional[tuple[str, str]] = None, tokenizer: Optional[str] = None,
                 length_unit: str = "tokens", smooth: int = 1, min_bin_pairs: int = 10) -> dict:
    """Write every figure that the runs have data for, summary.csv and runs.csv; returns {name: path}."""
    import pandas as pd

    os.makedirs(out_dir, exist_ok=True)
    rows = collect(runs, split, win_column, win_scores, tokenizer, length_unit)
    if len({r.get("length_unit") for r in rows if r.get("length_unit")}) > 1:  # one unit on one axis
        rows = collect(runs, split, win_column, win_scores, tokenizer, "words")
    summary = summarize(rows)
    written = {}

    def series(metric, stage):
        return summary[(summary.metric == metric) & (summary.stage == stage)]

    written["rm_accuracy_vs_size"] = plot_errorbars(
        os.path.join(out_dir, "rm_accuracy_vs_size.png"),
        {f"{s} ({'TL;DR' if s == 'validation' else 'CNN/DM'})": series(f"rm_accuracy/{s}", "reward")
         for s in RM_SPLITS},
        "accuracy", "Reward model accuracy, mean ± std over seeds")
    written["rouge_vs_size"] = plot_errorbars(
        os.path.join(out_dir, "rouge_vs_size.png"),
        {"SFT": series("rougeL", "sft"), "base model": series("rougeL", "base")},
        "ROUGE-L (validation)", "SFT ROUGE-L, mean ± std over seeds")
    written["win_rate_vs_size"] = plot_win_rates(os.path.join(out_dir, "win_rate_vs_size.png"), rows, "size",
                                                 "Win rate against the reference summaries")
    written["win_rate_vs_length"] = plot_win_rates(os.path.join(out_dir, "win_rate_vs_length.png"),
                                                   [r for r in rows if "mean_length" in r], "mean_length",
                                                   "Win rate against response length")
    tables = []
    for run in runs:
        path = os.path.join(run.path, f"{split}_calibration.csv")
        if run.stage == "reward" and os.path.exists(path):
            tables.append((run.size, run.seed, pd.read_csv(path, lineterminator="\n")))
    written["rm_calibration"] = plot_calibration(os.path.join(out_dir, "rm_calibration.png"),
                                                 calibration_frame(tables, min_bin_pairs) if tables else [])
    written["ppo_curves"] = plot_ppo_curves(os.path.join(out_dir, "ppo_curves.png"), runs, smooth)
    summary.to_csv(os.path.join(out_dir, "summary.csv"), index=False)
    pd.DataFrame(rows).to_csv(os.path.join(out_dir, "runs.csv"), index=False)
    written["summary"] = os.path.join(out_dir, "summary.csv")
    written["runs"] = os.path.join(out_dir, "runs.csv")
    return {k: v for k, v in written.items() if v}


def parse_size_map(entries: list[str]) -> dict[str, float]:
    out = {}
    for entry in entries:
        name, sep, params = entry.partition("=")
        if not sep:
            raise SystemExit(f"--size_map takes NAME=PARAMS (e.g. smollm2=135e6), got {entry!r}")
        out[name] = float(params)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("runs", nargs="+", help="run folders, globs, or folders to search for run_info.json")
    p.add_argument("--out_dir", default="runs/paper_figures", help="where the PNG files and CSVs go")
    p.add_argument("--split", default="validation", help="evaluation split of the tables and calibration")
    p.add_argument("--win_column", default=None, help="win-rate column of {split}_table.csv instead of judged files")
    p.add_argument("--win_scores", default=None, help="A,B: win when column A > column B (ties count 1/2)")
    p.add_argument("--size_map", nargs="*", default=[], help="NAME=PARAMS: size of models whose name contains NAME")
    p.add_argument("--length_unit", choices=("tokens", "words"), default="tokens",
                   help="response length unit; tokens need a tokenizer (the run folder's or --tokenizer)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for lengths (default: each run's own)")
    p.add_argument("--smooth", type=int, default=1, help="rolling mean over this many PPO updates before averaging")
    p.add_argument("--min_bin_pairs", type=int, default=10, help="calibration bins with fewer pairs are left out")
    args = p.parse_args(argv)
    if args.win_scores:
        args.win_scores = tuple(args.win_scores.split(","))
        if len(args.win_scores) != 2:
            raise SystemExit("--win_scores takes two column names: A,B")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    folders = find_run_folders(args.runs)
    if not folders:
        raise SystemExit(f"no run folder (with run_info.json) in {args.runs}")
    runs = [load_run(f, parse_size_map(args.size_map)) for f in folders]
    written = make_figures(runs, args.out_dir, args.split, args.win_column, args.win_scores, args.tokenizer,
                           args.length_unit, args.smooth, args.min_bin_pairs)
    import pandas as pd

    summary = pd.read_csv(written["summary"])
    counts = ", ".join(f"{sum(r.stage == s for r in runs)} {STAGE_NAMES[s]}" for s in ("base", *STAGES))
    print(f"{len(runs)} runs ({counts})")
    print(summary.drop(columns="size").to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for name, path in written.items():
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
