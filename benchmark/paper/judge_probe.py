"""An LLM judge as one more health signal of a PPO run, patched into ppo_tldr.py from outside (optional, off unless
this wrapper runs the stage; the stage itself carries no HTTP client).

Each time ppo_tldr.py writes its validation probe's table (every `--sample_every` updates: the probe's greedy
responses next to their reference summaries, `samples/update_N.csv`), benchmark/paper/judge.py's client asks any
OpenAI-compatible server which of the two summaries is better, with the paper's prompt [N+ 1.F.5], and the
update's health signals gain
  health/judge_win_rate   share of the probe's prompts where the judge prefers the policy's summary (unusable
                          answers are left out and counted, as judge.py does)
  health/judge_drop       the best judged win rate of the run so far minus this update's
Between two judged updates the last judged value stands. The health monitor checks `judge_drop` like its own
checks: over `--judge_max_drop` for `--health_patience` updates in a row, it records an incident and rolls back
(README "Watching a run"). The default limit, 0.15, is about 1.7 standard deviations of a win rate near 0.5 on a
32-prompt probe, so one unlucky judgement rarely fails the check and two in a row almost never do; a smaller probe
needs a larger limit. The best win rate is read back from the monitor's own history, which every resumable state
keeps, so `--resume` continues with it. The judgements go to `samples/update_N_judged.csv` and are cached in
`samples/judge_cache.jsonl` (a resumed run asks nothing twice).

    python benchmark/paper/judge_probe.py --judge_base_url http://localhost:8000/v1 \\
        --judge_model Qwen/Qwen2.5-7B-Instruct \\
        <ppo_tldr.py flags, with --sample_every 1 and --validation_probe_size 32 or more>

A local server works as well as a hosted one, e.g. `transformers serve <model folder>` with --judge_model <model
folder>; --judge_max_tokens caps each answer (that server writes up to 1024 tokens otherwise). The API key comes from
--judge_api_key or $OPENAI_API_KEY. Only rank 0 asks the judge; its value is broadcast, so every rank's monitor takes
the same decision.
"""

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import judge  # noqa: E402

WIN_RATE, DROP = "health/judge_win_rate", "health/judge_drop"


def judge_signals(history: list[dict], judged: float | None) -> dict:
    """The two signals of an update from the monitor's history of earlier updates and this update's judged win rate
    (None: not judged this update, or no usable answer): the last judged value stands until the next."""
    earlier = [h[WIN_RATE] for h in history if WIN_RATE in h]
    current = judged if judged is not None else (earlier[-1] if earlier else None)
    if current is None:
        return {}
    return {WIN_RATE: current, DROP: max(earlier + [current]) - current}


def install(ppo, client: "judge.Client", max_drop: float | None, seed: int = 0, concurrency: int = 8) -> None:
    """Wrap `ppo.write_probe_table` (judge the probe it wrote) and `ppo.health_update` (add the signals), and add
    the `judge_drop` check to `ppo.HEALTH_CHECKS` and to the monitor's limits (None: logged, never checked)."""
    import pandas as pd
    from accelerate.utils import broadcast_object_list

    pending: dict = {}
    write, health_update, monitor_class = ppo.write_probe_table, ppo.health_update, ppo.HealthMonitor

    def judged_write(args, accelerator, logger, tokenizer, update, *rest):
        write(args, accelerator, logger, tokenizer, update, *rest)
        value = [None]
        if accelerator.is_main_process:
            folder = os.path.join(args.output_dir, "samples")
            table = pd.read_csv(os.path.join(folder, f"update_{update:06d}.csv"), keep_default_na=False)
            cache = judge.JudgementCache(os.path.join(folder, "judge_cache.jsonl"))
            judged, summary = judge.judge_table(table, client, cache, seed=seed, concurrency=concurrency)
            judged.to_csv(os.path.join(folder, f"update_{update:06d}_judged.csv"), index=False)
            if summary["n_valid"]:
                value = [summary["win_rate"]]
            print(f"judge probe, update {update}: win rate {summary['win_rate']:.3f} on {summary['n_valid']} of "
                  f"{summary['n_rows']} prompts ({summary['invalid']} without a usable answer)", flush=True)
        broadcast_object_list(value)
        pending["win_rate"] = value[0]

    def judged_health_update(monitor, metrics, texts, probe_reference_mean):
        signals = health_update(monitor, metrics, texts, probe_reference_mean)
        return {**signals, **judge_signals(monitor.history, pending.pop("win_rate", None))}

    class JudgedMonitor(monitor_class):
        def __init__(self, thresholds: dict, patience: int):
            super().__init__({**thresholds, "judge_drop": max_drop}, patience)

    ppo.HEALTH_CHECKS = {**ppo.HEALTH_CHECKS, "judge_drop": (DROP, "judge_max_drop")}
    ppo.write_probe_table, ppo.health_update, ppo.HealthMonitor = judged_write, judged_health_update, JudgedMonitor


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The judge's flags; everything else is ppo_tldr.py's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--judge_base_url", required=True, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    p.add_argument("--judge_model", default=judge.DEFAULT_MODEL, help="the judge's model name on that server")
    p.add_argument("--judge_api_key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--judge_max_drop", type=float, default=0.15,
                   help="limit of health/judge_drop (negative: log the signals, never trip)")
    p.add_argument("--judge_concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--judge_seed", type=int, default=0, help="seed of the A/B order per row")
    p.add_argument("--judge_max_tokens", type=int, default=None,
                   help="cap on each answer's tokens (default: the server's; transformers serve writes up to 1024)")
    return p.parse_known_args(argv)


def main(argv: list[str]) -> None:
    import tyro

    import ppo_tldr

    opts, rest = parse_args(argv)
    args = tyro.cli(ppo_tldr.Args, args=rest)
    if args.validation_probe_size == 0 or args.sample_every == 0:
        raise SystemExit("the judge reads the validation probe's table: set --validation_probe_size > 0 and "
                         "--sample_every > 0")
    client = judge.Client(base_url=opts.judge_base_url, model=opts.judge_model, api_key=opts.judge_api_key,
                          max_tokens=opts.judge_max_tokens)
    max_drop = None if opts.judge_max_drop < 0 or math.isinf(opts.judge_max_drop) else opts.judge_max_drop
    install(ppo_tldr, client, max_drop, opts.judge_seed, opts.judge_concurrency)
    ppo_tldr.main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
