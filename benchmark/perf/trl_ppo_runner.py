"""One timed PPO run through TRL 1.12.0's `trl.experimental.ppo.PPOTrainer`, the last TRL release with a PPO trainer.

Runs inside the TRL virtual environment that `bench_ppo.py --trl` creates (TRL is never a dependency of this
project), with the configuration `bench_ppo.py` writes, and appends one JSON line per update to --out:
  time/update, time/generation, time/scoring, time/training  seconds; training = update - generation - scoring
  perf/generated_tokens, perf/training_tokens, perf/training_attention_pairs   as ppo_tldr.py logs them
  time/peak_memory_gib  process peak (CPU) or CUDA max allocated
  loss/policy_avg, loss/value_avg, objective/kl, ...       TRL's own logged metrics of that update
Timing wraps TRL's module-level functions: `batch_generation` (generation) and the no-grad calls of `forward` and
`get_reward` (reference, value and reward scoring); grad-enabled `forward` calls are the training forwards, whose
token counts are recorded.
"""

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def peak_memory_gib(torch) -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="JSON written by bench_ppo.py")
    p.add_argument("--out", required=True, help="JSONL file, one line per update")
    cli = p.parse_args()
    cfg = json.load(open(cli.config))

    import torch
    import trl
    import trl.experimental.ppo.ppo_trainer as T
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if trl.__version__ != "1.12.0":
        raise SystemExit(f"expected TRL 1.12.0, found {trl.__version__}")
    torch.manual_seed(cfg["seed"])
    tok = AutoTokenizer.from_pretrained(cfg["sft"], padding_side="left")
    dtype = torch.float32  # bf16 runs use autocast (PPOConfig bf16=True), as the project's runs do
    policy = AutoModelForCausalLM.from_pretrained(cfg["sft"], dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(cfg["sft"], dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(cfg["rm"], num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(cfg["rm"], num_labels=1, dtype=dtype)
    train = Dataset.from_dict({"input_ids": cfg["prompts"]})

    timers = {"generation": 0.0, "scoring": 0.0, "training_tokens": 0, "training_attention_pairs": 0,
              "generated_tokens": 0}
    original_generation, original_forward, original_get_reward = T.batch_generation, T.forward, T.get_reward

    if cfg.get("replay"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import ppo_replay

        table = ppo_replay.load_replay(cfg["replay"])

        def generation(model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config):
            responses = ppo_replay.lookup_responses(table, queries, pad_token_id)
            query_responses = torch.cat((queries, responses), 1)
            logits = ppo_replay.scaled_response_logits(model, query_responses, pad_token_id, responses.shape[1],
                                                       cfg["temperature"])
            return query_responses, logits
    else:
        generation = original_generation

    def timed_generation(model, queries, *args, **kwargs):
        t0 = time.time()
        out = generation(model, queries, *args, **kwargs)
        timers["generation"] += time.time() - t0
        timers["generated_tokens"] += out[0].shape[0] * (out[0].shape[1] - queries.shape[1])
        return out

    def timed_forward(model, query_responses, pad_token_id):
        if torch.is_grad_enabled():  # a training forward: count its work
            timers["training_tokens"] += query_responses.numel()
            timers["training_attention_pairs"] += query_responses.numel() * query_responses.shape[1]
            return original_forward(model, query_responses, pad_token_id)
        t0 = time.time()
        out = original_forward(model, query_responses, pad_token_id)
        timers["scoring"] += time.time() - t0
        return out

    def timed_get_reward(model, query_responses, pad_token_id, context_length):
        t0 = time.time()
        out = original_get_reward(model, query_responses, pad_token_id, context_length)
        timers["scoring"] += time.time() - t0
        return out

    T.batch_generation, T.forward, T.get_reward = timed_generation, timed_forward, timed_get_reward

    records = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs = dict(logs or {})

        def on_step_end(self, args, state, control, **kwargs):
            now = time.time()
            update = now - self.last
            self.last = now
            rec = {"update": state.global_step, "time/update": update,
                   "time/generation": timers["generation"], "time/scoring": timers["scoring"],
                   "time/training": update - timers["generation"] - timers["scoring"],
                   "perf/generated_tokens": timers["generated_tokens"],
                   "perf/training_tokens": timers["training_tokens"],
                   "perf/training_attention_pairs": timers["training_attention_pairs"],
                   "time/peak_memory_gib": peak_memory_gib(torch), **getattr(self, "logs", {})}
            for k in timers:
                timers[k] = 0.0 if isinstance(timers[k], float) else 0
            records.append(rec)
            with open(cli.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps({k: rec[k] for k in ("update", "time/update", "time/generation", "time/training")}),
                  flush=True)

    args = PPOConfig(
        output_dir=cfg["output_dir"],
        per_device_train_batch_size=cfg["micro_batch"],
        gradient_accumulation_steps=cfg["batch"] // cfg["micro_batch"],
        num_mini_batches=1,
        local_rollout_forward_batch_size=cfg["rollout_batch"],
        total_episodes=cfg["batch"] * cfg["updates"],
        num_ppo_epochs=cfg["epochs"],
        response_length=cfg["response_length"],
        temperature=cfg["temperature"],
        learning_rate=cfg["learning_rate"],
        adam_epsilon=1e-5,  # the paper's (and ppo_tldr.py's) AdamW settings
        weight_decay=0.01,
        kl_coef=cfg["kl_coef"],
        stop_token="eos" if cfg.get("truncate_at_eos") else None,
        missing_eos_penalty=None,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        bf16=cfg["precision"] == "bf16",
        use_cpu=not torch.cuda.is_available(),
        seed=cfg["seed"],
        dataloader_num_workers=0,
    )
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=train, callbacks=[Clock()])
    trainer.train()


if __name__ == "__main__":
    main()
