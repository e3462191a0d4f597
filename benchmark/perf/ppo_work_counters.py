"""The work counters of benchmark/perf/bench_ppo.py, patched into ppo_tldr.py from outside: the stage carries no
benchmark code.

Per update, into the update's record of metrics.jsonl (the one holding `objective/scores`), as ppo_tldr.py would name
them and as benchmark/perf/trl_ppo_runner.py logs them for TRL:
  perf/generated_tokens          tokens sampled by the rollouts (`generate_with_logprobs`; the probe and the final
                                 evaluation are not counted)
  perf/training_tokens           token positions through the training forwards, the sum of b*T over every
                                 `forward` call made with gradients (the rollouts' forwards run without)
  perf/training_attention_pairs  the sum of b*T^2 over the same calls (attention FLOPs grow with it)
The counts are this process's; rank 0 writes the records. Wrapping leaves every computed number as it was.

    python benchmark/perf/ppo_work_counters.py <ppo_tldr.py flags>      # what bench_ppo.py runs
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

COUNTERS = ("perf/generated_tokens", "perf/training_tokens", "perf/training_attention_pairs")


def install(ppo) -> dict:
    """Wrap `ppo.generate_with_logprobs`, `ppo.forward` and `ppo.Logger.log` (whatever they are now, so a patch made
    before, such as ppo_replay.py's generation, is counted too); returns the live counts of the current update."""
    import torch

    counts = dict.fromkeys(COUNTERS, 0.0)
    generate, forward, log = ppo.generate_with_logprobs, ppo.forward, ppo.Logger.log

    def counted_generate(*args, **kwargs):
        responses, logprobs = generate(*args, **kwargs)
        counts["perf/generated_tokens"] += responses.numel()
        return responses, logprobs

    def counted_forward(model, ids, pad_token_id, **kwargs):
        if torch.is_grad_enabled():  # a training forward
            counts["perf/training_tokens"] += ids.numel()
            counts["perf/training_attention_pairs"] += ids.numel() * ids.shape[1]
        return forward(model, ids, pad_token_id, **kwargs)

    def counted_log(self, metrics: dict, samples: int) -> None:
        if "objective/scores" in metrics:  # one record per update: it gets the update's counts, which start again
            metrics = {**metrics, **counts}
            counts.update(dict.fromkeys(COUNTERS, 0.0))
        log(self, metrics, samples)

    ppo.generate_with_logprobs, ppo.forward, ppo.Logger.log = counted_generate, counted_forward, counted_log
    return counts


def main(argv: list[str]) -> None:
    import tyro

    import ppo_tldr

    install(ppo_tldr)
    ppo_tldr.main(tyro.cli(ppo_tldr.Args, args=argv))


if __name__ == "__main__":
    main(sys.argv[1:])
