"""Fixed rollouts for comparing two PPO implementations on the same data (`bench_ppo.py --check_numerics`).

Sampling draws from each implementation's own random stream, so two implementations never see the same responses.
This module replaces generation in both with a lookup: every query (its non-pad token ids) maps to a response saved
beforehand, and the "generation" log-probs are recomputed with one forward pass of the policy on query + response,
temperature-scaled as the sampler's scores are. Everything after generation (reference log-probs, values, scores,
KL, GAE, whitening, the PPO losses and the optimizer step) is then each implementation's own code, so their first
update's losses must agree up to rounding.

Used in two environments: imported by `ppo_replay.py ours ...` (this project; patches `ppo_tldr.generate_with_logprobs`)
and by `trl_ppo_runner.py` (TRL 1.12.0's virtual environment; patches its `batch_generation`). It imports only
torch, so both can load it.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

ENV = "PPO_REPLAY_FILE"  # path of the JSON list [{"query": [ids], "response": [ids]}, ...]


def load_replay(path: str) -> dict:
    with open(path) as f:
        rows = json.load(f)
    return {tuple(r["query"]): r["response"] for r in rows}


def lookup_responses(table: dict, queries: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(B, R) saved responses of left-padded (B, Q) queries; a query missing from the table is an error."""
    out = []
    for i, row in enumerate(queries.tolist()):
        key = tuple(t for t in row if t != pad_token_id)
        if key not in table:
            raise KeyError(f"query {i} of the batch ({len(key)} tokens) has no saved response in ${ENV}")
        out.append(table[key])
    return torch.tensor(out, dtype=queries.dtype, device=queries.device)


@torch.no_grad()
def scaled_response_logits(policy, query_responses: torch.Tensor, pad_token_id: int, response_length: int,
                           temperature: float) -> torch.Tensor:
    """(B, R, V) logits / (T + 1e-7) that predict each response token: what HF's sampler returns as scores."""
    mask = query_responses != pad_token_id
    positions = (mask.cumsum(1) - mask.long()).clamp(min=0)
    logits = policy(input_ids=query_responses, attention_mask=mask, position_ids=positions, use_cache=False).logits
    return logits[:, -response_length - 1 : -1].float() / (temperature + 1e-7)


def run_ours(argv: list[str]) -> None:
    """`python benchmark/perf/ppo_replay.py ours <ppo_tldr.py flags>`: ppo_tldr.py with generation replaced."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import ppo_tldr
    import tyro

    table = load_replay(os.environ[ENV])
    args = tyro.cli(ppo_tldr.Args, args=argv)

    def replayed(model, queries, pad_token_id, generation_config, response_length):
        responses = lookup_responses(table, queries, pad_token_id)
        logits = scaled_response_logits(model, torch.cat((queries, responses), 1), pad_token_id, response_length,
                                        args.temperature)
        logprobs = torch.gather(F.log_softmax(logits, dim=-1), 2, responses.unsqueeze(-1)).squeeze(-1)
        return responses, logprobs

    import ppo_work_counters  # the perf/* counters bench_ppo.py reads, on top of the replay

    # The patches are undone afterwards: a caller that imported ppo_tldr (a test, a second run) gets it back unchanged.
    saved = ppo_tldr.generate_with_logprobs, ppo_tldr.forward, ppo_tldr.Logger.log
    try:
        ppo_tldr.generate_with_logprobs = replayed
        ppo_work_counters.install(ppo_tldr)
        ppo_tldr.main(args)
    finally:
        ppo_tldr.generate_with_logprobs, ppo_tldr.forward, ppo_tldr.Logger.log = saved


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "ours":
        raise SystemExit("usage: PPO_REPLAY_FILE=rollouts.json python benchmark/perf/ppo_replay.py ours "
                         "<ppo_tldr.py flags>")
    run_ours(sys.argv[2:])
