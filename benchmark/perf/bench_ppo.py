"""Throughput and memory of `ppo_tldr.py`, side by side with TRL 1.12.0's PPO trainer, against the device's limit.

For one model and batch shape it runs `ppo_tldr.py` (and, with --trl, TRL 1.12.0's `PPOTrainer` in its own virtual
environment, `.venv-trl`, created on first use) --runs times each, alternating, and prints per update:
  generation, scoring (reference + value + reward forwards) and training seconds; episodes per second; generated
  tokens per second; the training step's achieved FLOP/s against the matmul peak measured in the same invocation
  (so the ratio holds on any machine); peak memory, next to what the four models must hold (weights, gradients and
  AdamW state of policy + value, weights of reference + reward).
Steady state is reported: the first update of every run is a warm-up and is left out of the per-run means; the
summary takes the median over runs. Results go to <out_dir>/summary.json and <out_dir>/<system>_run<k>.jsonl.

Both systems get the same model folders, the same prompts (rows of the offline task whose formatted query has
--query_tokens tokens, give or take a few, so every batch has the same shape), response length, batch, micro-batch,
epochs, learning rate and precision, and sample the full response length (the paper's setting).

FLOP count of one update's training step (useful work only, the same formula for both systems):
  per trained network 6 * N_body * P  +  6 * L * d * A  (causal attention: half of the T^2 score matrix),
  plus the policy's LM head on the response positions 6 * d * V * R * S,
where N_body = parameters outside the embeddings and the LM head, P = token positions through the training forwards
(sum of b*T), A = sum of b*T^2, S = sequences trained (epochs x batch).

    python benchmark/perf/bench_ppo.py --model smollm2 --trl                      # the CPU comparison in the README
    python benchmark/perf/bench_ppo.py --model smollm2 --precision bf16 --runs 3  # bf16 autocast
    python benchmark/perf/bench_ppo.py --model smollm2 --trl --check_numerics     # same rollouts: first-update losses
    python benchmark/perf/bench_ppo.py --model pythia-1b --precision bf16 --batch 64 --micro_batch 16  # on a GPU
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OFFLINE = os.path.join(ROOT, "benchmark", "offline")  # tldr_synth.py, the synthetic task
sys.path.insert(0, ROOT)

TRL_VENV = os.path.join(ROOT, ".venv-trl")
TRL_PINS = ["torch==2.13.0", "transformers==5.24.0", "accelerate==1.15.0", "datasets==5.2.0", "trl==1.12.0"]
# Random-initialised shapes (GPT-NeoX, as Pythia) for GPUs; "tiny" is a 2-layer Llama and "pythia-tiny" a 2-layer
# GPT-NeoX (Pythia's architecture at toy size, benchmark/perf/gpu_check.py's CPU mode) for a smoke run anywhere.
SHAPES = {
    "tiny": dict(arch="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "pythia-tiny": dict(arch="gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256),
    "pythia-1b": dict(arch="gpt_neox", hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                      intermediate_size=8192, vocab_size=50304),
    "pythia-2.8b": dict(arch="gpt_neox", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                        intermediate_size=10240, vocab_size=50304),
}
# The metrics compared by --check_numerics: ppo_tldr.py's name -> TRL's (both include padding positions where the
# reference does).
NUMERICS = {
    "objective/kl": "objective/kl",
    "objective/scores": "objective/scores",
    "objective/entropy_with_padding": "objective/entropy",
    "ppo/loss/policy_avg": "loss/policy_avg",
    "ppo/loss/value_avg": "loss/value_avg",
    "ppo/policy/approxkl_avg_with_padding": "policy/approxkl_avg",
    "ppo/policy/clipfrac_avg": "policy/clipfrac_avg",
    "ppo/policy/entropy_avg_with_padding": "policy/entropy_avg",
    "ppo/val/clipfrac_avg": "val/clipfrac_avg",
    "ppo/val/ratio": "val/ratio",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", *SHAPES])
    p.add_argument("--base_model", default="models/smollm2-135m",
                   help="causal LM folder used as --model smollm2 (benchmark/offline/convert_smollm2.py writes SmolLM2 "
                        "here); its tokenizer serves every shape")
    p.add_argument("--data_dir", default="data/tldr_synth",
                   help="offline task (benchmark/offline/tldr_synth.py; generated if missing) or a folder with "
                        "train.jsonl")
    p.add_argument("--out_dir", default=None, help="default runs/bench/<model>_<precision>")
    p.add_argument("--batch", type=int, default=8, help="rollouts per update")
    p.add_argument("--micro_batch", type=int, default=8, help="rollouts per training forward")
    p.add_argument("--rollout_batch", type=int, default=8, help="rollouts per generation / scoring forward")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--response_length", type=int, default=53)
    p.add_argument("--query_tokens", type=int, default=200, help="formatted query length of the chosen prompts")
    p.add_argument("--updates", type=int, default=3, help="updates per run; the first is a warm-up")
    p.add_argument("--runs", type=int, default=3, help="runs per system (median reported)")
    p.add_argument("--precision", default="fp32",
                   help="ppo_tldr.py precision(s), comma-separated: fp32, bf16 (autocast over fp32 weights), or both")
    p.add_argument("--trl", action="store_true", help="also run TRL 1.12.0 (fp32 unless --trl_precision)")
    p.add_argument("--trl_precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--check_numerics", action="store_true",
                   help="one update of both systems on the same saved rollouts; prints their logged losses side by "
                        "side (implies --trl; no timing)")
    p.add_argument("--ours_flags", default="",
                   help="extra ppo_tldr.py flags (ablations), e.g. --ours_flags='--adam_impl foreach'")
    p.add_argument("--learning_rate", type=float, default=3e-6)
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Counting and summarising (pure; tested)
# ---------------------------------------------------------------------------------------------------------


def body_parameters(model) -> int:
    """Parameters outside the input embedding and the LM head (tied or not)."""
    skip = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        skip.add(id(head.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def training_flops(record: dict, shape: dict, batch: int, epochs: int, response_length: int) -> float:
    """Useful FLOPs of one update's training step (policy + value), from its logged work counters.

    shape: n_body (policy), n_body_value, layers, hidden, vocab. Both networks see the same token positions."""
    p, a = record["perf/training_tokens"], record["perf/training_attention_pairs"]
    attention = 6 * shape["layers"] * shape["hidden"] * a
    lm_head = 6 * shape["hidden"] * shape["vocab"] * response_length * epochs * batch
    policy = 6 * shape["n_body"] * p + attention + lm_head
    value = 6 * shape["n_body_value"] * p + attention
    return policy + value


def summarise(records: list[dict], shape: dict, args, peak_gflops: float) -> dict:
    """Means over the steady-state updates (all but the first) of one run."""
    steady = records[1:] or records
    mean = lambda k: statistics.fmean(r[k] for r in steady)  # noqa: E731
    flops = statistics.fmean(training_flops(r, shape, args.batch, args.epochs, args.response_length) for r in steady)
    out = {
        "updates_timed": len(steady),
        "update_s": mean("time/update"), "generation_s": mean("time/generation"), "scoring_s": mean("time/scoring"),
        "training_s": mean("time/training"),
        "episodes_per_s": args.batch / mean("time/update"),
        "generated_tokens_per_s": mean("perf/generated_tokens") / mean("time/generation"),
        "training_tflop": flops / 1e12,
        "training_gflops_per_s": flops / mean("time/training") / 1e9,
        "peak_memory_gib": max(r["time/peak_memory_gib"] for r in records),
    }
    out["training_fraction_of_matmul_peak"] = out["training_gflops_per_s"] / peak_gflops
    return out


def median_over_runs(summaries: list[dict]) -> dict:
    return {k: statistics.median(s[k] for s in summaries) for k in summaries[0]}


def memory_floor_gib(n_policy: int, n_value: int, trainable_bytes: int = 4) -> dict:
    """What the four models must hold: fp32 weights + gradients + AdamW's two moments for policy and value
    (16 bytes per parameter), and fp32 weights of the frozen reference (= policy) and reward (= value) models."""
    trained = (n_policy + n_value) * trainable_bytes * 4
    frozen = (n_policy + n_value) * 4
    return {"trained_gib": trained / 2**30, "frozen_gib": frozen / 2**30, "total_gib": (trained + frozen) / 2**30}


# ---------------------------------------------------------------------------------------------------------
# Set-up: models, prompts, the TRL environment
# ---------------------------------------------------------------------------------------------------------


def matmul_peak_gflops(dtype_name: str, n: int = 4096, repeats: int = 5) -> float:
    """Best of `repeats` square n x n matmuls on the device the runs use: the reachable peak."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def prepare_models(args, out: str) -> dict:
    """<out>/sft (causal LM with a pad token) and <out>/rm (one-label sequence classifier) for the chosen shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    sft_dir, rm_dir = os.path.join(out, "sft"), os.path.join(out, "rm")
    if not os.path.isdir(args.base_model):
        raise SystemExit(f"{args.base_model} not found: run `python benchmark/offline/convert_smollm2.py` first")
    if not os.path.exists(os.path.join(rm_dir, "config.json")):
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(args.base_model)
        if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
            tok.add_special_tokens({"pad_token": "[PAD]"})  # pad != EOS, as sft_tldr.py does
        if args.model == "smollm2":
            policy = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32)
        else:
            spec = dict(SHAPES[args.model])
            arch = spec.pop("arch")
            spec.setdefault("vocab_size", len(tok))
            config = AutoConfig.for_model(arch, **spec, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
            policy = AutoModelForCausalLM.from_config(config)
        if len(tok) > policy.get_input_embeddings().weight.shape[0]:
            policy.resize_token_embeddings(len(tok))
        policy.config.pad_token_id = tok.pad_token_id
        policy.save_pretrained(sft_dir)
        tok.save_pretrained(sft_dir)
        rm = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1)  # random score head
        rm.config.pad_token_id = tok.pad_token_id
        rm.config.reward_bias = 0.0  # what ppo_tldr.py requires of a reward-model folder (reward_tldr.py writes it)
        rm.save_pretrained(rm_dir)
        tok.save_pretrained(rm_dir)
    with torch.device("meta"):
        policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sft_dir))
        value = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(rm_dir))
    cfg = policy.config
    n_policy, n_value = sum(p.numel() for p in policy.parameters()), sum(p.numel() for p in value.parameters())
    return {"sft": sft_dir, "rm": rm_dir, "n_params": n_policy, "n_params_value": n_value,
            "n_body": body_parameters(policy), "n_body_value": body_parameters(value),
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size}


def prepare_prompts(args, out: str, sft_dir: str, count: int) -> list[list[int]]:
    """`count` rows of the offline task's train split whose formatted query is closest to --query_tokens tokens,
    written in the hub schema to <out>/data/{train,validation}.jsonl; returns their token ids for TRL."""
    from transformers import AutoTokenizer

    import ppo_tldr

    train_file = os.path.join(args.data_dir, "sft", "train.jsonl")
    if os.path.exists(os.path.join(args.data_dir, "train.jsonl")):  # a folder of SFT splits itself
        train_file = os.path.join(args.data_dir, "train.jsonl")
    elif not os.path.exists(train_file):
        subprocess.run([sys.executable, os.path.join(OFFLINE, "tldr_synth.py"), "--out_dir", args.data_dir], check=True,
                       cwd=ROOT)
    tok = AutoTokenizer.from_pretrained(sft_dir)
    rows = [json.loads(line) for line in open(train_file)]
    ids = [ppo_tldr.truncated_query_tokens(tok, r, 512) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (abs(len(ids[i]) - args.query_tokens), i))[:count]
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    for split in ("train", "validation"):
        with open(os.path.join(data, f"{split}.jsonl"), "w") as f:
            for i in order:
                f.write(json.dumps(rows[i]) + "\n")
    lengths = [len(ids[i]) for i in order]
    print(f"prompts: {count} rows, formatted query {min(lengths)}-{max(lengths)} tokens")
    return [ids[i] for i in order]


def ensure_trl_venv() -> str:
    python = os.path.join(TRL_VENV, "bin", "python")
    if not os.path.exists(python):
        print(f"creating {TRL_VENV} with {' '.join(TRL_PINS)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", TRL_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    return python


def save_replay(models: dict, prompts: list[list[int]], args, path: str) -> None:
    """Responses sampled once by the policy at T=0.7 for every prompt, for --check_numerics."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(models["sft"])
    policy = AutoModelForCausalLM.from_pretrained(models["sft"], dtype=torch.float32).eval()
    policy.generation_config.eos_token_id = None  # exactly R tokens, EOS sampleable (see ppo_tldr.sampling_config)
    torch.manual_seed(args.seed)
    width = max(map(len, prompts))
    queries = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    config = GenerationConfig(max_new_tokens=args.response_length, do_sample=True, temperature=0.7, top_k=0,
                              top_p=1.0, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        out = policy.generate(input_ids=queries, attention_mask=queries != tok.pad_token_id, generation_config=config)
    responses = out[:, width:].tolist()
    with open(path, "w") as f:
        json.dump([{"query": q, "response": r} for q, r in zip(prompts, responses)], f)


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------


def run_ours(args, models: dict, out: str, k: int, precision: str, replay: str = None, tag: str = "") -> list[dict]:
    run_dir = os.path.join(out, f"ours{'_' + tag if tag else ''}_run{k}")
    flags = ["--sft_model_path", models["sft"], "--reward_model_path", models["rm"], "--dataset",
             os.path.join(out, "data"), "--output_dir", run_dir, "--response_length", str(args.response_length),
             "--batch_size", str(args.batch), "--local_micro_batch_size", str(args.micro_batch),
             "--local_rollout_forward_batch_size", str(args.rollout_batch), "--noptepochs", str(args.epochs),
             "--total_episodes", str(args.batch * args.updates), "--learning_rate", str(args.learning_rate),
             "--seed", str(args.seed + k), "--validation_probe_size", "0", "--no-run-eval", "--sample_every", "0",
             *args.ours_flags.split()]
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16" if precision == "bf16" else "no"}
    if replay:
        # the same rule as TRL's run below: no missing-EOS penalty
        cmd = [sys.executable, os.path.join(HERE, "ppo_replay.py"), "ours", *flags, "--penalty_reward_value", "None"]
        env["PPO_REPLAY_FILE"] = replay
    else:
        cmd = [sys.executable, os.path.join(HERE, "ppo_work_counters.py"), *flags]  # ppo_tldr.py + perf/* counters
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        os.remove(os.path.join(run_dir, "metrics.jsonl"))
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r for r in records if "time/update" in r]


def run_trl(args, models: dict, out: str, k: int, prompts, replay: str = None) -> list[dict]:
    python = ensure_trl_venv()
    cfg = {"sft": models["sft"], "rm": models["rm"], "prompts": prompts, "output_dir": os.path.join(out, f"trl_run{k}"),
           "batch": args.batch, "micro_batch": args.micro_batch, "rollout_batch": args.rollout_batch,
           "updates": args.updates, "epochs": args.epochs, "response_length": args.response_length,
           "temperature": 0.7, "learning_rate": args.learning_rate, "kl_coef": 0.05, "seed": args.seed + k,
           "precision": args.trl_precision, "replay": replay, "truncate_at_eos": bool(replay)}
    cfg_path, records_path = os.path.join(out, f"trl_run{k}.json"), os.path.join(out, f"trl_run{k}.jsonl")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    if os.path.exists(records_path):
        os.remove(records_path)
    subprocess.run([python, os.path.join(HERE, "trl_ppo_runner.py"), "--config", cfg_path, "--out", records_path],
                   check=True, cwd=ROOT, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    return [json.loads(line) for line in open(records_path)]


def print_table(rows: dict) -> None:
    keys = ["update_s", "generation_s", "scoring_s", "training_s", "episodes_per_s", "generated_tokens_per_s",
            "training_gflops_per_s", "training_fraction_of_matmul_peak", "peak_memory_gib"]
    print(f"{'':34s}" + "".join(f"{name:>16s}" for name in rows))
    for key in keys:
        print(f"{key:34s}" + "".join(f"{rows[name][key]:16.3f}" for name in rows))


def check_numerics(args, models, out, prompts) -> dict:
    replay = os.path.join(out, "replay.json")  # one update over exactly the `batch` prepared prompts
    save_replay(models, prompts, args, replay)
    ours = run_ours(args, models, out, 0, args.precisions[0], replay=replay)[0]
    trl = run_trl(args, models, out, 0, prompts, replay=replay)[0]
    print(f"\nfirst update on the same {args.batch} saved rollouts (ppo_tldr.py {args.precisions[0]}, TRL "
          f"{args.trl_precision}):")
    print(f"{'ppo_tldr.py metric':40s}{'ppo_tldr.py':>16s}{'TRL 1.12.0':>16s}{'rel. diff':>12s}")
    result = {}
    for mine, theirs in NUMERICS.items():
        a, b = ours[mine], trl[theirs]
        rel = abs(a - b) / max(abs(a), abs(b), 1e-12)
        result[mine] = {"ppo_tldr": a, "trl": b, "rel_diff": rel}
        print(f"{mine:40s}{a:16.8g}{b:16.8g}{rel:12.2e}")
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.check_numerics:  # one update of both systems on the same rollouts
        args.trl, args.updates = True, 1
    args.precisions = args.precision.split(",")
    if not set(args.precisions) <= {"fp32", "bf16"}:
        raise SystemExit(f"--precision {args.precision}: expected fp32, bf16 or fp32,bf16")
    if args.check_numerics and len(args.precisions) > 1:
        raise SystemExit(f"--check_numerics compares one precision with TRL; got --precision {args.precision}")
    out = args.out_dir or os.path.join("runs", "bench", f"{args.model}_{'_'.join(args.precisions)}")
    out = os.path.join(ROOT, out) if not os.path.isabs(out) else out
    os.makedirs(out, exist_ok=True)
    import torch

    models = prepare_models(args, out)
    prompts = prepare_prompts(args, out, models["sft"], args.batch * args.updates)
    summary = {"args": vars(args), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
               f"CPU, {torch.get_num_threads()} threads", "models": {k: v for k, v in models.items()
                                                                     if k not in ("sft", "rm")}}
    summary["memory_floor"] = memory_floor_gib(models["n_params"], models["n_params_value"])
    if args.check_numerics:
        summary["numerics"] = check_numerics(args, models, out, prompts)
        with open(os.path.join(out, "numerics.json"), "w") as f:
            json.dump(summary, f, indent=1)
        return
    peaks = {p: matmul_peak_gflops(p) for p in sorted({*args.precisions, args.trl_precision})}
    summary["matmul_peak_gflops"] = peaks
    print("matmul peak: " + ", ".join(f"{p} {g:.1f} GFLOP/s" for p, g in peaks.items()), flush=True)
    names = [f"ppo_tldr {p}" for p in args.precisions] + ([f"TRL 1.12.0 {args.trl_precision}"] if args.trl else [])
    per_run = {name: [] for name in names}
    for k in range(args.runs):  # alternate the systems, so drifting machine load hits all alike
        for precision in args.precisions:
            records = run_ours(args, models, out, k, precision, tag=precision)
            per_run[f"ppo_tldr {precision}"].append(summarise(records, models, args, peaks[precision]))
        if args.trl:
            records = run_trl(args, models, out, k, prompts)
            per_run[names[-1]].append(summarise(records, models, args, peaks[args.trl_precision]))
    summary["runs"] = per_run
    rows = {name: median_over_runs(per_run[name]) for name in names}
    summary["median"] = rows
    print(f"\n{args.model}, batch {args.batch}, micro-batch {args.micro_batch}, {args.epochs} epochs, response "
          f"{args.response_length}, queries ~{args.query_tokens} tokens; median of {args.runs} runs, "
          f"{args.updates - 1} steady updates each")
    print_table(rows)
    if args.trl:
        summary["speedup_median"] = {}
        for precision in args.precisions:
            ratios = [a["episodes_per_s"] / b["episodes_per_s"]
                      for a, b in zip(per_run[f"ppo_tldr {precision}"], per_run[names[-1]])]
            summary["speedup_median"][precision] = statistics.median(ratios)
            print(f"episodes/s ratio ppo_tldr {precision} / TRL {args.trl_precision}: median "
                  f"{statistics.median(ratios):.2f}x (runs: {', '.join(f'{r:.2f}' for r in ratios)})")
    floor = summary["memory_floor"]
    print(f"memory the four models must hold: {floor['total_gib']:.2f} GiB (trained weights+grads+AdamW "
          f"{floor['trained_gib']:.2f}, frozen weights {floor['frozen_gib']:.2f}); peak measured "
          + ", ".join(f"{name} {row['peak_memory_gib']:.2f}" for name, row in rows.items()))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {os.path.join(out, 'summary.json')}")


if __name__ == "__main__":
    main()
