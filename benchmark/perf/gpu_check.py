"""GPU check: SFT, reward model and PPO through the real stage scripts, timed per phase, in one command, offline.

    python benchmark/perf/gpu_check.py         # one GPU: a random-initialised Pythia-1B-shaped model
    python benchmark/perf/gpu_check.py --tiny  # any machine, CPU included: a 2-layer GPT-NeoX (tests/test_gpu_check.py)

Time: it finishes in under 8 minutes (--time_limit 480 s, counted from the start, model building included): a path
is stopped and fails when it would run into the last 30 s (10 s in tiny mode), kept for stopping it and the report,
and a path with too little time left is reported as not run.
The sizes are meant to fit all paths into that limit on one H100/H200-class GPU. Without a GPU it runs the tiny
mode: about 1.5 minutes on 2 CPU cores (the first DeepSpeed run on CPU also compiles DeepSpeed's shared-memory
communication op, once per torch version: about 70 s more).

No network and no hub: the models are built from a config (bench_ppo.SHAPES "pythia-1b": GPT-NeoX, 16 layers, hidden
2048, vocabulary 50,304; "pythia-tiny" in tiny mode) with random weights; the tokenizer is a byte-level BPE trained here
on the synthetic task's text (benchmark/offline/tldr_synth.py), whose data the stages read in the hub datasets' schema.
Prompts are the rows whose formatted query is closest to --query_tokens tokens (at most 512 after smart truncation).

Code paths (each a subprocess running the stage script as a user would):
  sft, rm, ppo                    `python <stage>.py`, bf16 autocast over fp32 weights, SDPA attention, 1 process
  sft_zero2, rm_zero2, ppo_zero2  `accelerate launch --use_deepspeed --zero_stage 2 --mixed_precision bf16`, 1 process
  ppo_zero3_offload               as ppo_zero2, plus --offload: frozen reference and reward models in ZeRO-3 with their
                                  parameters on the CPU (the paper's 6.9B recipe)
The DeepSpeed paths need the `deepspeed` package (requirements-gpu.txt); without it they print "skipped: not
installed". On CPU they run with DS_ACCELERATOR=cpu and the gloo backend, as tests/test_deepspeed.py does.

What it prints and writes (<out_dir>/gpu_check.json), per path: generation, scoring and training time; episodes/s
(PPO: rollouts, SFT: sequences, RM: pairs) and generated tokens/s; the training step's model FLOP utilisation (useful
FLOPs over time, against the bf16 matmul peak measured on the same device at start); peak memory (GPU: the
allocator's peak; CPU: the process's peak RSS). PPO figures are per update (steady state: the first update is a
warm-up and left out), SFT and RM training figures per optimizer step (the first left out), and SFT generation and
SFT/RM scoring over their evaluation. SFT and RM run under benchmark/perf/stage_timer.py, which adds those clocks to the
stage's own records; ppo_tldr.py logs its clocks itself and runs under benchmark/perf/ppo_work_counters.py for the token
counts. Then a PASS/FAIL/SKIP line per path (a path passes when the stage exits 0, logged every step, saved its
model and ran with the precision, attention kernel and DeepSpeed stage it was meant to), and a projection of the
paper's 1M-episode Pythia-1B PPO run on 8 GPUs from the measured update, with the arithmetic shown. Exit status:
0 when no path failed (skipped paths allowed), 1 otherwise, 2 for a missing package.

Versions: it needs what requirements.txt lists except gguf and pytest, and `deepspeed` for the DeepSpeed paths. It
pins and installs nothing, so it runs on a GPU machine's own torch and transformers; a missing package is named at
start with the commands to install it offline from wheels (no pins: the installed torch stays). The oldest versions
it has run with (every path, tiny mode) are listed below; older ones are tried with a warning.
"""

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OFFLINE = os.path.join(ROOT, "benchmark", "offline")  # tldr_synth.py, the synthetic task
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

# import name -> distribution name, for what the stages and this script import
REQUIRED = {"torch": "torch", "transformers": "transformers", "accelerate": "accelerate", "datasets": "datasets",
            "tyro": "tyro", "rouge_score": "rouge-score", "tokenizers": "tokenizers", "safetensors": "safetensors",
            "numpy": "numpy", "pandas": "pandas", "matplotlib": "matplotlib", "tqdm": "tqdm",
            "huggingface_hub": "huggingface-hub"}
OPTIONAL = {"deepspeed": "deepspeed"}
# the oldest versions this check has run with (tiny mode, every path); older ones are tried with a warning
MIN_TESTED = {"python": "3.11", "torch": "2.11.0", "transformers": "5.17.0", "huggingface_hub": "1.33.0",
              "accelerate": "1.15.0", "datasets": "5.2.0", "tyro": "1.0.17", "rouge_score": "0.1.2",
              "deepspeed": "0.19.8"}

PATHS = {  # name -> (stage, DeepSpeed setting, description)
    "sft": ("sft", None, "sft_tldr.py, bf16 autocast, SDPA, 1 process"),
    "rm": ("rm", None, "reward_tldr.py, bf16 autocast, SDPA, 1 process"),
    "ppo": ("ppo", None, "ppo_tldr.py, bf16 autocast, SDPA, 1 process"),
    "sft_zero2": ("sft", "zero2", "sft_tldr.py, DeepSpeed ZeRO-2 bf16, 1 process"),
    "rm_zero2": ("rm", "zero2", "reward_tldr.py, DeepSpeed ZeRO-2 bf16, 1 process"),
    "ppo_zero2": ("ppo", "zero2", "ppo_tldr.py, DeepSpeed ZeRO-2 bf16, 1 process"),
    "ppo_zero3_offload": ("ppo", "offload", "ppo_tldr.py, DeepSpeed ZeRO-2 bf16 + --offload (frozen models in ZeRO-3, "
                                            "parameters on CPU), 1 process"),
}
STAGE_NAMES = {"sft": "SFT", "rm": "RM", "ppo": "PPO"}

# Paper run being projected: 999,936 episodes in batches of 512 on 8 GPUs (ppo_tldr.py's defaults, README).
PAPER_EPISODES, PAPER_BATCH, PAPER_GPUS = 999_936, 512, 8

SIZES = {
    # one GPU: the paper's per-GPU PPO share (512 / 8 = 64 rollouts, micro-batch 16, 4 epochs, 53 tokens)
    "gpu": dict(shape="pythia-1b", corpus=dict(n_sft_train=2000, n_sft_validation=200, n_sft_test=200, n_cmp_train=2000,
                                               n_cmp_validation=400),
                query_tokens=480, prompts=192, comparisons=(128, 64), matmul_n=8192, min_start_s=30, reserve_s=30,
                sft=dict(batch=32, micro=16, steps=4, eval_samples=64, eval_batch=32),
                rm=dict(batch=32, micro=8, steps=4, eval_samples=64, normalization=64, eval_batch=32),
                ppo=dict(batch=64, micro=16, rollout=64, updates=3, ds_updates=2, probe=16)),
    # CPU: the same code paths on a 2-layer model, a few rows
    "tiny": dict(shape="pythia-tiny", corpus=dict(n_sft_train=300, n_sft_validation=20, n_sft_test=20, n_cmp_train=200,
                                                  n_cmp_validation=40),
                 query_tokens=200, prompts=12, comparisons=(12, 4), matmul_n=512, min_start_s=5, reserve_s=10,
                 sft=dict(batch=4, micro=2, steps=3, eval_samples=4, eval_batch=4),
                 rm=dict(batch=4, micro=2, steps=3, eval_samples=4, normalization=4, eval_batch=4),
                 ppo=dict(batch=4, micro=2, rollout=4, updates=2, ds_updates=2, probe=2)),
}
RESPONSE_LENGTH = 53  # PPO's sampled tokens and SFT's response, as the paper
TOKENIZER_VOCAB = 1000  # BPE tokens trained on the synthetic posts (the model keeps Pythia's 50,304 embedding rows)


def parse_args(argv=None):
    oldest = ", ".join(f"{name} {version}" for name, version in MIN_TESTED.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1] + f"\nOldest versions tested: {oldest}.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny mode (the default where no CUDA device is found)")
    p.add_argument("--out_dir", default="runs/gpu_check", help="models, data, runs and gpu_check.json")
    p.add_argument("--json", default=None, help="where the results go (default <out_dir>/gpu_check.json)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {', '.join(PATHS)}")
    p.add_argument("--time_limit", type=float, default=480, help="seconds for the whole check (default 8 minutes)")
    p.add_argument("--query_tokens", type=int, default=None,
                   help="prompts, SFT rows and comparisons are those whose formatted query is closest to this many "
                        "tokens (default 480; tiny mode 200)")
    p.add_argument("--fresh", action="store_true", help="rebuild the tokenizer, data and models (kept otherwise)")
    args = p.parse_args(argv)
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    unknown = [x for x in args.paths if x not in PATHS]
    if unknown or not args.paths:
        p.error(f"--paths: unknown {unknown or 'none given'}; expected some of {', '.join(PATHS)}")
    return args


# ---------------------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------------------


def package_versions() -> tuple[dict, dict]:
    """(versions of the importable packages, {import name: error} of those that fail to import)."""
    import importlib
    import importlib.metadata

    versions, missing = {}, {}
    for name, dist in {**REQUIRED, **OPTIONAL}.items():
        saved = os.environ.get("DS_ACCELERATOR")
        if name == "deepspeed" and "torch" in versions and saved is None:
            import torch

            if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator, named so it prints no warning
                os.environ["DS_ACCELERATOR"] = "cpu"
        try:
            module = importlib.import_module(name)
        except Exception as error:  # ImportError, or a broken install that fails while importing
            missing[name] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            continue
        finally:
            if saved is None:
                os.environ.pop("DS_ACCELERATOR", None)
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = str(getattr(module, "__version__", "installed"))
        versions[name] = versions[name].split("+")[0]
    return versions, missing


def version_tuple(v: str) -> tuple:
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def install_note(names: list[str]) -> str:
    """How to install distributions offline from wheels without touching the installed torch."""
    dists = " ".join(names)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    lines = [f"  to install offline: on a machine with network and Python {py},",
             f"      pip download -d wheels {dists}",
             "  copy wheels/ here, then",
             f"      pip install --no-index --find-links wheels {dists}",
             "  Unpinned, so pip keeps the torch installed here (never `pip install -r requirements.txt` on such a "
             "machine: it pins torch).",
             "  tyro and rouge-score are pure-Python wheels (their dependencies too, but nltk's regex, which "
             "transformers also needs); accelerate and datasets are too, but may bring compiled dependencies "
             "(psutil, pyyaml; pyarrow, xxhash, pandas)."]
    if "deepspeed" in names:
        lines += ["  deepspeed is a source package: build its wheel where the network is, with no CUDA ops (they are "
                  "compiled on first use),",
                  "      DS_BUILD_OPS=0 pip wheel --no-deps -w wheels deepspeed==0.19.8",
                  "      pip download -d wheels einops hjson msgpack ninja py-cpuinfo pydantic psutil",
                  "  (pydantic-core, msgpack, ninja and psutil are small compiled wheels)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer, data, models
# ---------------------------------------------------------------------------------------------------------


def build_tokenizer(sft_train: str, out: str) -> None:
    """A byte-level BPE (as Pythia's) trained on the synthetic posts and summaries; EOS `<|endoftext|>` is id 0, as
    in Pythia, and there is no pad token (the stages add `[PAD]`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import ppo_tldr

    with open(sft_train) as f:
        rows = [json.loads(line) for line in f]
    text = [ppo_tldr.format_query(r["subreddit"], r["title"], r["post"]) + " " + r["summary"] for r in rows]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)


def closest_rows(rows: list[dict], lengths: list[int], target: int, count: int) -> list[int]:
    """Indices of the `count` rows whose length is closest to `target` (ties: file order)."""
    return sorted(range(len(rows)), key=lambda i: (abs(lengths[i] - target), i))[:count]


def select_comparisons(corpus: str, out: str, tokenizer_dir: str, target: int, counts: tuple[int, int]) -> dict:
    """Comparisons (train, validation) whose formatted query is closest to `target` tokens, in the hub schema."""
    from transformers import AutoTokenizer

    import reward_tldr

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    os.makedirs(out, exist_ok=True)
    lengths_kept = {}
    for split, count in zip(("train", "validation"), counts):
        with open(os.path.join(corpus, "comparisons", f"{split}.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        lengths = [len(reward_tldr.truncated_query_tokens(tok, r["info"], 512)) for r in rows]
        keep = closest_rows(rows, lengths, target, count)
        with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
            for i in keep:
                f.write(json.dumps(rows[i]) + "\n")
        lengths_kept[split] = [lengths[i] for i in keep]
    return {split: [min(v), max(v)] for split, v in lengths_kept.items()}


def prepare(args, size: dict, root: str) -> dict:
    """Tokenizer, synthetic corpus, the models and the selected rows under `root`; kept for the next run unless
    --fresh. Returns paths and model shape counts."""
    import bench_ppo

    query_tokens = args.query_tokens or size["query_tokens"]
    if args.fresh and os.path.isdir(root):
        shutil.rmtree(root)
    corpus, tokenizer = os.path.join(root, "corpus"), os.path.join(root, "tokenizer")
    if not os.path.exists(os.path.join(corpus, "meta.json")):
        cmd = [sys.executable, os.path.join(OFFLINE, "tldr_synth.py"), "--out_dir", corpus, "--overwrite"]
        for name, n in size["corpus"].items():
            cmd += [f"--{name}", str(n)]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    if not os.path.exists(os.path.join(tokenizer, "tokenizer.json")):
        build_tokenizer(os.path.join(corpus, "sft", "train.jsonl"), tokenizer)
    models = bench_ppo.prepare_models(SimpleNamespace(model=size["shape"], base_model=tokenizer),
                                      os.path.join(root, "models"))
    prompts_dir = os.path.join(root, "data")  # bench_ppo.prepare_prompts writes <root>/data/{train,validation}.jsonl
    prompt_args = SimpleNamespace(data_dir=corpus, query_tokens=query_tokens)
    bench_ppo.prepare_prompts(prompt_args, root, models["sft"], size["prompts"])
    comparisons = select_comparisons(corpus, os.path.join(root, "comparisons"), models["sft"], query_tokens,
                                     size["comparisons"])
    from transformers import AutoTokenizer

    import ppo_tldr

    tok = AutoTokenizer.from_pretrained(models["sft"])
    with open(os.path.join(prompts_dir, "train.jsonl")) as f:
        query_lengths = [len(ppo_tldr.truncated_query_tokens(tok, json.loads(line), 512)) for line in f]
    return {**models, "prompts": prompts_dir, "comparisons": os.path.join(root, "comparisons"),
            "tokenizer": tokenizer, "vocab_tokens": len(tok), "prompt_query_tokens": [min(query_lengths),
                                                                                      max(query_lengths)],
            "comparison_query_tokens": comparisons}


# ---------------------------------------------------------------------------------------------------------
# Running one path
# ---------------------------------------------------------------------------------------------------------


def stage_command(name: str, size: dict, data: dict, run_dir: str) -> list[str]:
    """The stage's command line (before the launcher)."""
    stage, ds, _ = PATHS[name]
    if stage == "sft":
        s = size["sft"]
        return [os.path.join(HERE, "stage_timer.py"), "sft", "--base_model", data["sft"], "--dataset", data["prompts"],
                "--response_length", str(RESPONSE_LENGTH), "--batch_size", str(s["batch"]),
                "--local_micro_batch_size", str(s["micro"]), "--total_episodes", str(s["batch"] * s["steps"]),
                "--eval_splits", "validation", "--max_eval_samples", str(s["eval_samples"]),
                "--local_eval_batch_size", str(s["eval_batch"]), "--seed", "1", "--output_dir", run_dir]
    if stage == "rm":
        s = size["rm"]
        return [os.path.join(HERE, "stage_timer.py"), "rm", "--sft_model_path", data["sft"], "--dataset",
                data["comparisons"], "--sft_dataset", data["prompts"], "--batch_size", str(s["batch"]),
                "--local_micro_batch_size", str(s["micro"]), "--total_episodes", str(s["batch"] * s["steps"]),
                "--max_eval_samples", str(s["eval_samples"]), "--normalization_samples", str(s["normalization"]),
                "--local_eval_batch_size", str(s["eval_batch"]), "--seed", "1", "--output_dir", run_dir]
    s = size["ppo"]
    updates = s["updates"] if ds is None else s["ds_updates"]
    cmd = [os.path.join(HERE, "ppo_work_counters.py"), "--sft_model_path", data["sft"],
           "--reward_model_path", data["rm"],
           "--dataset", data["prompts"], "--response_length", str(RESPONSE_LENGTH), "--batch_size", str(s["batch"]),
           "--local_micro_batch_size", str(s["micro"]), "--local_rollout_forward_batch_size", str(s["rollout"]),
           "--total_episodes", str(s["batch"] * updates), "--validation_probe_size", str(s["probe"]),
           "--sample_every", "0", "--no_run_eval", "--attn_implementation", "sdpa", "--seed", "1",
           "--output_dir", run_dir]
    return cmd + (["--offload"] if ds == "offload" else [])


def launch(name: str, stage_cmd: list[str], on_gpu: bool) -> tuple[list[str], dict]:
    """The full command and environment: plain `python` with bf16 autocast, or `accelerate launch` with DeepSpeed."""
    _, ds, _ = PATHS[name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled"}
    if ds is None:
        env["ACCELERATE_MIXED_PRECISION"] = "bf16"  # read by Accelerator(): autocast over fp32 weights
        return [sys.executable, *stage_cmd], env
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU (gloo), as tests/test_deepspeed.py
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--use_deepspeed", "--zero_stage", "2", "--mixed_precision", "bf16", "--dynamo_backend", "no",
            *stage_cmd], env


def run_process(cmd: list[str], env: dict, log_path: str, timeout: float, grace: float) -> tuple[int, bool]:
    """(exit status, timed out); the whole process group is stopped at the timeout (launchers start children)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1)), False
        except subprocess.TimeoutExpired:
            stop_group(proc, grace)
            return proc.returncode, True
        except BaseException:  # Ctrl-C: the stage runs in its own process group and would not see it
            stop_group(proc, grace)
            raise


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process group (a stage then saves a state and exits), SIGKILL after `grace` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def read_records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_lines(path: str, n: int = 6) -> str:
    with open(path, errors="replace") as f:
        lines = [line.rstrip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join("      " + line[:300] for line in lines[-n:])


# ---------------------------------------------------------------------------------------------------------
# Figures (pure; tested)
# ---------------------------------------------------------------------------------------------------------


def lm_training_flops(n_body: int, layers: int, hidden: int, tokens: float, pairs: float, head_positions: float,
                      vocab: int) -> float:
    """Useful FLOPs of forward + backward: 6 x body parameters x tokens, causal attention 6 x layers x hidden x
    sum(b*T^2) (half of the T^2 scores), and an LM head of `vocab` rows on `head_positions` positions (the same
    counting as bench_ppo.training_flops)."""
    return 6 * n_body * tokens + 6 * layers * hidden * pairs + 6 * hidden * vocab * head_positions


def step_figures(records: list[dict], key: str, batch: int, flops_of, peak_gflops: float) -> dict:
    """Training figures from the records that close an optimizer step (`key` present): the time between two of
    them is one step; the first step (warm-up) is left out when there is a later one."""
    steps = [r for r in records if key in r]
    if not steps:
        return {}
    walls = [r["timer/wall"] for r in steps]
    before = [r["timer/wall"] for r in records[: records.index(steps[0])] if "timer/wall" in r]
    intervals = [(b - a, r) for a, b, r in zip(walls, walls[1:], steps[1:])]
    if not intervals and before:
        intervals = [(walls[0] - before[-1], steps[0])]
    if not intervals:
        return {}
    seconds = statistics.fmean(s for s, _ in intervals)
    flops = statistics.fmean(flops_of(r) for _, r in intervals)
    return {"steps_timed": len(intervals), "training_s": seconds, "episodes_per_s": batch / seconds,
            "training_tflop": flops / 1e12, "training_gflops_per_s": flops / seconds / 1e9,
            "training_fraction_of_matmul_peak": flops / seconds / 1e9 / peak_gflops}


def sft_figures(records: list[dict], shape: dict, batch: int, peak_gflops: float) -> dict:
    def flops(r):  # SFT's LM head runs on every position
        return lm_training_flops(shape["n_body"], shape["layers"], shape["hidden"], r["timer/train_tokens"],
                                 r["timer/train_attention_pairs"], r["timer/train_tokens"], shape["vocab"])

    out = step_figures(records, "train/sft/loss", batch, flops, peak_gflops)
    evaluation = [r for r in records if "validation/sft/loss" in r]
    if evaluation:
        r = evaluation[0]
        out.update({"generation_s": r["timer/generation_s"], "scoring_s": r["timer/scoring_s"],
                    "generated_tokens": r["timer/generated_tokens"],
                    "generated_tokens_per_s": r["timer/generated_tokens"] / max(r["timer/generation_s"], 1e-9)})
    return out


def rm_figures(records: list[dict], shape: dict, batch: int, peak_gflops: float) -> dict:
    def flops(r):  # the value/reward body (its score head included), no LM head
        return lm_training_flops(shape["n_body_value"], shape["layers"], shape["hidden"], r["timer/train_tokens"],
                                 r["timer/train_attention_pairs"], 0, 0)

    out = step_figures(records, "train/rm/loss", batch, flops, peak_gflops)
    after = records[max((i for i, r in enumerate(records) if "train/rm/loss" in r), default=-1) + 1:]
    scoring = sum(r.get("timer/scoring_s", 0.0) for r in after)
    tokens = sum(r.get("timer/scoring_tokens", 0) for r in after)
    out.update({"generation_s": None, "generated_tokens_per_s": None, "scoring_s": scoring,
                "scoring_tokens_per_s": tokens / scoring if scoring > 0 else None})
    return out


def ppo_figures(records: list[dict], shape: dict, batch: int, peak_gflops: float) -> dict:
    import bench_ppo

    updates = [r for r in records if "time/update" in r]
    if not updates:
        return {}
    out = bench_ppo.summarise(updates, shape, SimpleNamespace(batch=batch, epochs=4, response_length=RESPONSE_LENGTH),
                              peak_gflops)
    steady = updates[1:] or updates
    out["validation_probe_s"] = statistics.fmean(r["time/validation_probe"] for r in steady)
    return out


def projection(figures: dict, batch: int, path: str, tiny: bool) -> dict:
    """Wall time of the paper's run (999,936 episodes, batches of 512, 8 GPUs) from one GPU's measured update:
    each GPU does 512 / 8 episodes per update; an update measured at another batch is scaled linearly."""
    per_gpu = PAPER_BATCH // PAPER_GPUS
    updates = PAPER_EPISODES // PAPER_BATCH
    scale = per_gpu / batch
    parts = {k: figures[k] * scale for k in ("generation_s", "scoring_s", "training_s", "validation_probe_s")}
    update_s = figures["update_s"] * scale
    parts["other_s"] = update_s - sum(parts.values())
    wall_s = updates * update_s
    lines = [f"projection: the paper's Pythia-1B PPO run, {PAPER_EPISODES:,} episodes = {updates} updates of "
             f"{PAPER_BATCH} on {PAPER_GPUS} GPUs",
             f"  each GPU does {PAPER_BATCH} / {PAPER_GPUS} = {per_gpu} episodes per update; measured here ({path}, "
             f"one device, batch {batch}): {figures['update_s']:.3f} s per update"
             + (f", x {per_gpu}/{batch} = {update_s:.3f} s for {per_gpu} episodes" if batch != per_gpu else ""),
             f"    = generation {parts['generation_s']:.3f} + scoring {parts['scoring_s']:.3f} + training "
             f"{parts['training_s']:.3f} + validation probe {parts['validation_probe_s']:.3f} + other "
             f"{parts['other_s']:.3f} s",
             f"  {updates} updates x {update_s:.3f} s = {wall_s:,.0f} s = {wall_s / 3600:.2f} h",
             "  not included: the gradient all-reduce between the 8 GPUs (none on one device), loading and saving the "
             "models, the final evaluation"]
    if tiny:
        lines.append("  (tiny mode: a 2-layer model on this machine; the arithmetic of the GPU run, not an estimate "
                     "of it)")
    return {"path": path, "measured_batch": batch, "per_gpu_batch": per_gpu, "updates": updates,
            "scale": scale, "update_s": update_s, "phases_s": parts, "wall_s": wall_s, "wall_h": wall_s / 3600,
            "text": "\n".join(lines)}


# ---------------------------------------------------------------------------------------------------------
# Checks of a finished run
# ---------------------------------------------------------------------------------------------------------


def run_problems(name: str, size: dict, run_dir: str, records: list[dict], figures: dict) -> list[str]:
    """What a finished path lacks: every step logged, the model saved, the intended precision, kernel and stage."""
    stage, ds, _ = PATHS[name]
    problems = []
    if not os.path.exists(os.path.join(run_dir, "config.json")) or not any(
            f.startswith("model") and f.endswith(".safetensors") for f in os.listdir(run_dir)):
        problems.append("no saved model")
    if stage == "ppo":
        s = size["ppo"]
        want = s["updates"] if ds is None else s["ds_updates"]
        got = len([r for r in records if "time/update" in r])
    else:
        s = size[stage]
        want, got = s["steps"], len([r for r in records if f"train/{stage}/loss" in r])
    if got != want:
        problems.append(f"{got} of {want} {'updates' if stage == 'ppo' else 'optimizer steps'} logged")
    if stage != "ppo":
        first = next((r for r in records if "timer/attn_implementation" in r), {})
        if first.get("timer/attn_implementation") != "sdpa":
            problems.append(f"attention ran as {first.get('timer/attn_implementation')}, not sdpa")
        if ds is None and first.get("timer/autocast") != "bf16":
            problems.append(f"autocast was {first.get('timer/autocast')}, not bf16")
        if ds is not None and first.get("timer/param_dtype") != "bfloat16":
            problems.append(f"trained weights were {first.get('timer/param_dtype')}, not bf16")
    if ds is not None:
        config_path = os.path.join(run_dir, "deepspeed_config.json")
        if not os.path.exists(config_path):
            problems.append("no deepspeed_config.json: DeepSpeed did not run")
        else:
            with open(config_path) as f:
                config = json.load(f)
            if config.get("zero_optimization", {}).get("stage") != 2 or not config.get("bf16", {}).get("enabled"):
                problems.append(f"DeepSpeed ran with stage {config.get('zero_optimization', {}).get('stage')}, "
                                f"bf16 {config.get('bf16', {}).get('enabled')}")
    numbers = [v for k, v in figures.items() if k.endswith(("_s", "tflop", "peak", "gib")) and v is not None]
    if not figures or any(not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0) for v in numbers):
        problems.append(f"figures missing or not positive: {figures}")
    return problems


def peak_memory(records: list[dict]) -> float:
    values = [r["time/peak_memory_gib"] for r in records if "time/peak_memory_gib" in r]
    return max(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"


def print_table(results: dict) -> None:
    columns = [("generation_s", "gen s"), ("scoring_s", "score s"), ("training_s", "train s"),
               ("episodes_per_s", "episodes/s"), ("generated_tokens_per_s", "gen tok/s"),
               ("training_gflops_per_s", "train GFLOP/s"), ("training_fraction_of_matmul_peak", "MFU"),
               ("peak_memory_gib", "peak GiB")]
    rows = [(n, r["figures"]) for n, r in results.items() if r["status"] == "pass"]
    if not rows:
        return
    print("\nper path (PPO: per update; SFT/RM: training per optimizer step, generation and scoring over the "
          "evaluation; MFU against the bf16 matmul peak):")
    print(f"  {'path':20s}" + "".join(f"{label:>15s}" for _, label in columns))
    for name, f in rows:
        print(f"  {name:20s}" + "".join(f"{fmt(f.get(key)):>15s}" for key, _ in columns))


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    deadline = started + args.time_limit
    versions, broken = package_versions()
    missing_required = [REQUIRED[n] for n in REQUIRED if n in broken]
    print(f"gpu_check: Python {sys.version.split()[0]}; " + ", ".join(f"{n} {v}" for n, v in versions.items()))
    if missing_required:
        print(f"missing Python packages: {', '.join(missing_required)} ("
              + "; ".join(f"{n}: {broken[n]}" for n in REQUIRED if n in broken) + ")")
        print(install_note(missing_required))
        return 2
    current = {**versions, "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    old = [f"{n} {current[n]} (oldest tested {v})" for n, v in MIN_TESTED.items()
           if n in current and version_tuple(current[n]) < version_tuple(v)]
    if old:
        print("warning: older than this check was tested with: " + ", ".join(old))
    deepspeed_missing = "deepspeed" in broken
    if deepspeed_missing:
        print(f"deepspeed: not installed ({broken['deepspeed']}); the DeepSpeed paths are skipped")
        print(install_note(["deepspeed"]))

    import torch

    on_gpu = torch.cuda.is_available()
    tiny = args.tiny or not on_gpu
    size = SIZES["tiny" if tiny else "gpu"]
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} " \
                                                          f"threads)"
    print(f"device: {device}; mode: {'tiny (2-layer GPT-NeoX)' if tiny else 'Pythia-1B shape'}"
          + ("" if on_gpu or args.tiny else " (no CUDA device)"))
    out_dir = os.path.abspath(args.out_dir)
    root = os.path.join(out_dir, size["shape"])
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the model builder's load report (a new score head) and progress bars
    hf_logging.disable_progress_bar()
    try:
        data = prepare(args, size, root)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    shape = {k: data[k] for k in ("n_params", "n_params_value", "n_body", "n_body_value", "layers", "hidden", "vocab")}
    print(f"model: {size['shape']} (GPT-NeoX, {shape['layers']} layers, hidden {shape['hidden']}, vocabulary "
          f"{shape['vocab']:,}; {shape['n_params'] / 1e6:,.1f}M parameters, random init); tokenizer: byte-level BPE of "
          f"{data['vocab_tokens'] - 1:,} tokens trained on the synthetic task, plus [PAD]; set up in "
          f"{time.perf_counter() - t0:.1f} s")
    import bench_ppo

    peak_gflops = bench_ppo.matmul_peak_gflops("bf16", n=size["matmul_n"])
    print(f"bf16 matmul peak: {peak_gflops / 1e3:.3f} TFLOP/s ({size['matmul_n']}^3, best of 5)", flush=True)

    results = {}
    for k, name in enumerate(args.paths, 1):
        stage, ds, description = PATHS[name]
        result = {"stage": stage, "description": description, "deepspeed": ds, "status": "fail", "reason": "",
                  "seconds": 0.0, "figures": {}}
        results[name] = result
        label = f"[{k}/{len(args.paths)}] {name}: {description}"
        if ds is not None and deepspeed_missing:
            result.update(status="skipped", reason="skipped: not installed (deepspeed)")
            print(f"{label}: {result['reason']}", flush=True)
            continue
        remaining = deadline - size["reserve_s"] - time.perf_counter()  # the reserve: stopping a path, the report
        if remaining < size["min_start_s"]:
            result.update(status="not run", reason=f"not run: the {args.time_limit:.0f} s time limit")
            print(f"{label}: {result['reason']}", flush=True)
            continue
        run_dir = os.path.join(out_dir, "runs", name)
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        cmd, env = launch(name, stage_command(name, size, data, run_dir), on_gpu)
        result.update(command=" ".join(cmd), run_dir=run_dir, log=os.path.join(out_dir, "runs", f"{name}.log"))
        print(f"{label} ...", flush=True)
        t0 = time.perf_counter()
        code, timed_out = run_process(cmd, env, result["log"], remaining, grace=size["reserve_s"] / 2)
        result["seconds"] = time.perf_counter() - t0
        records = read_records(run_dir)
        s = size[stage]
        figures_of = {"sft": sft_figures, "rm": rm_figures, "ppo": ppo_figures}[stage]
        try:
            figures = figures_of(records, shape, s["batch"], peak_gflops)
        except (KeyError, ValueError, ZeroDivisionError) as error:
            figures = {"error": f"{type(error).__name__}: {error}"}
        if figures and "error" not in figures:
            figures["peak_memory_gib"] = peak_memory(records)
        result["figures"] = figures
        if timed_out:
            result["reason"] = f"stopped at the {args.time_limit:.0f} s time limit"
        elif code != 0:
            result["reason"] = f"exit status {code}"
        else:
            problems = run_problems(name, size, run_dir, records, figures)
            result["reason"] = "; ".join(problems)
            if not problems:
                result["status"] = "pass"
        if result["status"] == "pass":
            print(f"    passed in {result['seconds']:.1f} s", flush=True)
        else:
            print(f"    FAILED in {result['seconds']:.1f} s: {result['reason']} (log {result['log']})\n"
                  + last_lines(result["log"]), flush=True)

    print_table(results)
    proj = None
    for name in ("ppo_zero2", "ppo"):  # the paper's runs used DeepSpeed ZeRO-2
        if results.get(name, {}).get("status") == "pass":
            proj = projection(results[name]["figures"], size["ppo"]["batch"], name, tiny)
            print("\n" + proj["text"])
            break
    if proj is None:
        print("\nprojection: needs a passed ppo or ppo_zero2 path")

    print("\npaths exercised:")
    for name, r in results.items():
        status = {"pass": "PASS", "fail": "FAIL", "skipped": "SKIP", "not run": "FAIL"}[r["status"]]
        detail = f"  {r['reason']}" if r["reason"] else f"  ({r['seconds']:.1f} s)"
        print(f"  {status}  {name:18s} {r['description']}{detail}")
    counts = {s: sum(r["status"] == s for r in results.values()) for s in ("pass", "fail", "skipped", "not run")}
    wall = time.perf_counter() - started
    ok = counts["fail"] == 0 and counts["not run"] == 0
    summary = {"mode": "tiny" if tiny else "gpu", "device": device, "python": sys.version.split()[0],
               "versions": versions, "missing": broken, "model": {"shape": size["shape"], **shape,
                                                                   "tokenizer_tokens": data["vocab_tokens"]},
               "data": {"prompt_query_tokens": data["prompt_query_tokens"],
                        "comparison_query_tokens": data["comparison_query_tokens"]},
               "settings": {k: size[k] for k in ("sft", "rm", "ppo")}, "response_length": RESPONSE_LENGTH,
               "matmul_peak_gflops_bf16": peak_gflops, "paths": results, "projection": proj,
               "time_limit_s": args.time_limit, "wall_s": wall, "counts": counts, "result": "pass" if ok else "fail"}
    json_path = os.path.abspath(args.json or os.path.join(out_dir, "gpu_check.json"))
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nresult: {'PASS' if ok else 'FAIL'}: {counts['pass']} passed, {counts['fail'] + counts['not run']} failed, "
          f"{counts['skipped']} skipped in {wall:.0f} s (limit {args.time_limit:.0f} s); wrote {json_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
