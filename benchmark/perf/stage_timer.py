"""sft_tldr.py or reward_tldr.py with clocks and work counters around their forward passes
(benchmark/perf/gpu_check.py).

    python benchmark/perf/stage_timer.py sft <sft_tldr.py flags>
    accelerate launch --use_deepspeed ... benchmark/perf/stage_timer.py rm <reward_tldr.py flags>

The stage runs its own `main` with its own flags, data, training, evaluation and files. PPO needs no such wrapper:
ppo_tldr.py logs its per-phase times and work itself. SFT and RM log only totals, so this module wraps:
  sft_tldr.forward          (every forward pass of SFT training and of its teacher-forced evaluation)
  sft_tldr.generate         (the evaluation's sampling)
  reward_tldr.ScalarModel.forward   (RM training, normalisation and evaluation forwards)
  Logger.log                (each stage's one logging call)
and adds to every record the stage writes to metrics.jsonl, for the work done on this process since its previous
record:
  timer/wall                   seconds since the stage started, read once the GPU has finished its queued work
  timer/train_tokens           token positions through the training forwards (sum of b*T)
  timer/train_attention_pairs  sum of b*T^2 (causal attention FLOPs)
  timer/generation_s, timer/generated_tokens    sampling time and sampled tokens (SFT evaluation)
  timer/scoring_s, timer/scoring_tokens         forward passes without gradients (evaluation, RM normalisation)
and, in its first record, what the training forward ran with: timer/attn_implementation (the model config's
attention kernel), timer/autocast ("bf16", "fp16" or "off") and timer/param_dtype (of the trained weights).
A record written after an optimizer step closes that step: the time between two such records is one step.
"""

import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


class Counters:
    """Work and time since the previous record (reset by `take`), and what the first training forward ran with."""

    def __init__(self, device_sync):
        self.sync = device_sync
        self.start = self.now()
        self.config = None  # filled at the first training forward
        self.reset()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset(self) -> None:
        self.train_tokens = self.train_pairs = self.generated_tokens = self.scoring_tokens = 0
        self.generation_s = self.scoring_s = 0.0

    def take(self) -> dict:
        out = {"timer/wall": self.now() - self.start, "timer/train_tokens": self.train_tokens,
               "timer/train_attention_pairs": self.train_pairs, "timer/generation_s": self.generation_s,
               "timer/generated_tokens": self.generated_tokens, "timer/scoring_s": self.scoring_s,
               "timer/scoring_tokens": self.scoring_tokens}
        if self.config:
            out.update(self.config)
            self.config = {}  # reported once
        self.reset()
        return out

    def training_forward(self, model, ids) -> None:
        b, t = ids.shape
        self.train_tokens += b * t
        self.train_pairs += b * t * t
        if self.config is None:  # read inside the model's forward, where accelerate's autocast is active
            self.config = {}
            embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
            handle = None

            def record(module, inputs):
                self.config.update(describe(model))
                handle.remove()

            handle = embedding.register_forward_pre_hook(record)


def describe(model) -> dict:
    """The attention kernel, autocast state and weight dtype of a (possibly wrapped) model, during its forward."""
    config = next(m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "model_type"))
    parameter = next(model.parameters())
    device = parameter.device.type
    autocast = "off"
    if torch.is_autocast_enabled(device):
        autocast = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(torch.get_autocast_dtype(device), "other")
    return {"timer/attn_implementation": str(getattr(config, "_attn_implementation", None)), "timer/autocast": autocast,
            "timer/param_dtype": str(parameter.dtype).removeprefix("torch.")}


def install(stage: str):
    """Wrap the stage module's functions; returns the module (its `main` and `Args`)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    if stage == "sft":
        import sft_tldr as module
    elif stage == "rm":
        import reward_tldr as module
    else:
        raise SystemExit(f"unknown stage {stage!r}: expected sft or rm")
    counters = Counters(sync)

    log = module.Logger.log

    def timed_log(self, metrics: dict, samples: int) -> None:
        log(self, {**metrics, **counters.take()}, samples)

    module.Logger.log = timed_log

    if stage == "sft":
        forward, generate = module.forward, module.generate

        def counted_forward(model, ids, pad_token_id, **kwargs):
            if torch.is_grad_enabled():
                counters.training_forward(model, ids)
                return forward(model, ids, pad_token_id, **kwargs)
            t0 = counters.now()
            out = forward(model, ids, pad_token_id, **kwargs)
            counters.scoring_s += counters.now() - t0
            counters.scoring_tokens += ids.numel()
            return out

        def timed_generate(model, queries, pad_token_id, generation_config):
            t0 = counters.now()
            out = generate(model, queries, pad_token_id, generation_config)
            counters.generation_s += counters.now() - t0
            counters.generated_tokens += out.numel()
            return out

        module.forward, module.generate = counted_forward, timed_generate
    else:
        scalar_forward = module.ScalarModel.forward

        def counted_scalar_forward(self, input_ids, attention_mask):
            if torch.is_grad_enabled():
                counters.training_forward(self, input_ids)
                return scalar_forward(self, input_ids, attention_mask)
            t0 = counters.now()
            out = scalar_forward(self, input_ids, attention_mask)
            counters.scoring_s += counters.now() - t0
            counters.scoring_tokens += input_ids.numel()
            return out

        module.ScalarModel.forward = counted_scalar_forward
    return module


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("sft", "rm"):
        raise SystemExit("usage: python benchmark/perf/stage_timer.py {sft,rm} <the stage's flags>")
    import tyro

    module = install(argv[0])
    module.main(tyro.cli(module.Args, args=argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
