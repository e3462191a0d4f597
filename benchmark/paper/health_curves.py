"""A PPO run's health signals and its validation probe against updates: a table and a PNG (README "Watching a run").

Reads what `ppo_tldr.py` writes into its output folder: metrics.jsonl (the health/* signals of every update),
samples/update_*.csv (the validation probe's responses and RM scores) and health/ (incidents, summary). Each check
is drawn as its signal divided by its limit, so every check trips where its line crosses 1. On the offline task
(`--data_dir`, the synthetic corpus) the probe's responses are also scored by the gold judge, which the monitor
never sees: the figure then shows whether the monitor tripped before the gold score fell.

    python benchmark/paper/health_curves.py --ppo_dir runs/offline/ppo --data_dir data/tldr_synth

With `--limit` and `--patience` it also replays the monitor on the finished run with other limits: the signals are
logged every update and do not depend on the limits, so a run logged with `--health_action log` (or one that never
tripped) shows when other limits would have tripped and which policy they would have kept, without a new run:

    python benchmark/paper/health_curves.py --ppo_dir runs/long_s1/ppo --data_dir data/tldr_synth --limit kl=1.0
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "benchmark", "offline"))  # offline_pipeline, tldr_synth (the gold judge)
sys.path.insert(0, ROOT)

from ppo_tldr import HEALTH_CHECKS as CHECKS  # noqa: E402  check name -> (metric, flag holding its limit)


def health_rows(ppo_dir: str, examples: dict | None = None) -> tuple[list[dict], dict]:
    """One row per update: the update, its rollouts' KL, each check's signal, the probe's size and mean RM score (of
    the policy the update started from) and, with `examples` (the synthetic corpus by id), its mean gold score; and
    the limits."""
    from offline_pipeline import gold_scores, load_csv, read_metrics

    for name in ("run_info.json", "metrics.jsonl"):
        if not os.path.exists(os.path.join(ppo_dir, name)):
            raise SystemExit(f"{ppo_dir} is not a ppo_tldr.py output folder, or has not started: no {name}")
    args = json.load(open(os.path.join(ppo_dir, "run_info.json")))["args"]
    limits = {name: args.get(flag) for name, (_, flag) in CHECKS.items()}
    updates = [r for r in read_metrics(os.path.join(ppo_dir, "metrics.jsonl")) if "objective/scores" in r]
    rows = []
    for u, record in enumerate(updates, start=1):
        row = {"update": u, "objective_kl": record["objective/kl"],
               **{name: record.get(metric) for name, (metric, _) in CHECKS.items()}}
        if row.get("update_kl") is None:  # runs logged before the check existed: the same number, its own name
            row["update_kl"] = record.get("ppo/policy/approxkl_avg")
        probe = os.path.join(ppo_dir, "samples", f"update_{u:06d}.csv")
        if os.path.exists(probe):
            table = load_csv(probe)
            row["probe_n"] = len(table)
            row["probe_rm"] = sum(float(r["score"]) for r in table) / len(table)
            if examples is not None:
                row["probe_gold"] = sum(gold_scores(table, examples, "response")) / len(table)
        rows.append(row)
    return rows, limits


def replay(rows: list[dict], limits: dict, patience: int) -> list[dict]:
    """The incidents `ppo_tldr.HealthMonitor` would have recorded on these rows (`health_rows`) with `limits` and
    `patience`, in the shape of health/summary.json's: each with its update, the tripped checks ({name: [value,
    limit]}) and the last healthy update (`HealthMonitor.last_healthy_update`). As with `--health_action log`, the run goes on
    after each incident and the patience starts again."""
    from ppo_tldr import HealthMonitor

    monitor, incidents = HealthMonitor(limits, patience), []
    for row in rows:
        signals = {metric: row[name] for name, (metric, _) in CHECKS.items() if row.get(name) is not None}
        tripped = monitor.observe(row["update"], signals)
        if tripped:
            incidents.append({"update": row["update"], "tripped": {n: list(v) for n, v in tripped.items()},
                              "last_healthy_update": monitor.last_healthy_update(tripped)})
            monitor.reset()
    return incidents


def parse_limits(pairs: list[str], limits: dict) -> dict:
    """`limits` with each NAME=VALUE of `pairs` applied (VALUE `none` switches the check off)."""
    out = dict(limits)
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in CHECKS or not value:
            raise SystemExit(f"--limit {pair!r}: expected NAME=VALUE with NAME one of {', '.join(CHECKS)}")
        out[name] = None if value.lower() == "none" else float(value)
    return out


def failing(row: dict, limits: dict) -> list[str]:
    return [name for name, limit in limits.items() if limit is not None and row.get(name) is not None
            and row[name] > limit]


def plot_health(path: str, rows: list[dict], limits: dict, summary: dict | None = None) -> None:
    """Top: the probe's RM and gold scores (the policy each update started from); bottom: signal / limit per
    check, with the trip line at 1 and the updates where the monitor tripped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["update"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.2), sharex=True)
    if any("probe_rm" in r for r in rows):
        top.plot(x, [r.get("probe_rm") for r in rows], marker="s", markersize=3, color="tab:blue",
                 label="probe RM score")
    if any("probe_gold" in r for r in rows):
        gold = top.twinx()
        gold.plot(x, [r.get("probe_gold") for r in rows], marker="o", markersize=3, color="tab:green",
                  label="probe gold score")
        gold.set_ylabel("gold score (never seen by the monitor)", color="tab:green")
    top.set_ylabel("RM score", color="tab:blue")
    top.set_title("Validation probe, sampled before each update", fontsize=10)
    top.grid(True, linestyle="--", alpha=0.5)
    for name, limit in limits.items():
        if limit is None or all(r.get(name) is None for r in rows):
            continue
        bottom.plot(x, [r[name] / limit if r.get(name) is not None else None for r in rows], marker="o",
                    markersize=3, label=name)
    bottom.axhline(1.0, color="black", linewidth=1)
    for incident in (summary or {}).get("incidents", []):
        for ax in (top, bottom):
            ax.axvline(incident["update"], color="tab:red", linestyle=":", linewidth=1.5)
    bottom.set_ylabel("signal / limit (trips above 1)")
    bottom.set_xlabel("update")
    bottom.set_title("Health checks" + (" (red: the monitor tripped)" if (summary or {}).get("incidents") else ""),
                     fontsize=10)
    bottom.grid(True, linestyle="--", alpha=0.5)
    bottom.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ppo_dir", required=True, help="a ppo_tldr.py output folder")
    p.add_argument("--data_dir", help="the synthetic corpus (offline task): adds the probe's gold score")
    p.add_argument("--out", help="PNG path (default <ppo_dir>/health/health_curves.png)")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="replay the monitor with this check's limit changed (repeatable; VALUE none = off)")
    p.add_argument("--patience", type=int, help="replay the monitor with this patience (default: the run's)")
    args = p.parse_args(argv)
    examples = None
    if args.data_dir:
        import tldr_synth

        examples = {r["id"]: r for r in tldr_synth.read_jsonl(os.path.join(args.data_dir, "sft", "validation.jsonl"))}
    rows, limits = health_rows(args.ppo_dir, examples)
    if not rows:
        raise SystemExit(f"{args.ppo_dir}/metrics.jsonl has no finished update")
    summary_path = os.path.join(args.ppo_dir, "health", "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
    names = [n for n in CHECKS if limits[n] is not None and any(r.get(n) is not None for r in rows)]
    header = (["update"] + ([] if "kl" in names else ["objective_kl"]) + ["probe_rm"]
              + (["probe_gold"] if examples else []) + names + ["failing"])
    print(" | ".join(header))
    for r in rows:
        cells = [str(r["update"])] + [f"{r[k]:.3f}" if r.get(k) is not None else "" for k in header[1:-1]]
        print(" | ".join(cells + [",".join(failing(r, limits)) or "-"]))
    if summary:
        print(f"kept policy: update {summary['kept_policy_update']}; incidents: "
              + ("; ".join(f"update {i['update']} ({', '.join(i['tripped'])}) -> last healthy update "
                           f"{i['last_healthy_update']}" for i in summary["incidents"]) or "none"))
    if args.limit or args.patience is not None:
        print_replay(args, rows, parse_limits(args.limit, limits), examples)
    out = args.out or os.path.join(args.ppo_dir, "health", "health_curves.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    plot_health(out, rows, limits, summary)
    print(f"wrote {out}")


def print_replay(args, rows: list[dict], limits: dict, examples: dict | None) -> None:
    """The replayed monitor's incidents; on the offline task also provoke.py's verdict (gold fall before the first
    trip, the kept policy's probe gold against the final policy's on the same prompts)."""
    run_args = json.load(open(os.path.join(args.ppo_dir, "run_info.json")))["args"]
    patience = args.patience if args.patience is not None else run_args.get("health_patience", 2)  # Args' default
    incidents = replay(rows, limits, patience)
    changed = {n: v for n, v in limits.items() if v != run_args.get(CHECKS[n][1])}
    print(f"replayed with patience {patience}, limits changed: {changed or 'none'}: " + (
        "; ".join(f"update {i['update']} ({', '.join(i['tripped'])}) -> last healthy update "
                  f"{i['last_healthy_update']}" for i in incidents) or "no trip"))
    if examples is not None:
        from offline_pipeline import gold_scores, load_csv
        from provoke import verdict

        final, probe = (os.path.join(args.ppo_dir, p) for p in ("validation_table.csv", "samples/update_000001.csv"))
        final_gold = None
        if os.path.exists(final) and os.path.exists(probe):  # the final policy on the probe's prompts
            ids = {r["id"] for r in load_csv(probe)}
            final = [r for r in load_csv(final) if r["id"] in ids]
            final_gold = sum(gold_scores(final, examples, "response")) / len(final) if final else None
        print("verdict: " + json.dumps(verdict(rows, incidents, final_gold)))


if __name__ == "__main__":
    main()
