"""PPO on the offline task with the gold judge as its reward: what PPO itself can reach at a given budget.

`ppo_tldr.py` scores responses with a learned reward model. On the synthetic task the gold judge
(`tldr_synth.gold_score`) is known, so the same PPO can be run against it instead: every call of `get_score` (the
rollouts, the validation probe, the final evaluation of responses and references) returns the gold score of the
decoded response for the post the query was made from. Everything else is `ppo_tldr.py`'s own code, unchanged,
including the missing-EOS penalty, the KL penalty and the value model (initialised from the RM folder given, whose
scores are never used). The run answers one question: when PPO with a learned RM does not beat SFT, is it PPO's
budget or the reward model? A policy that improves against the gold reward but not against the RM points at the RM.

    python benchmark/offline/gold_reward_ppo.py --data_dir data/tldr_synth <ppo_tldr.py flags>
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch  # noqa: E402

import tldr_synth  # noqa: E402


def split_query(text: str) -> tuple[str, str]:
    """(title, post) of a decoded query in the TL;DR format (SUBREDDIT / TITLE / POST / TL;DR:)."""
    try:
        title = text.split("TITLE:", 1)[1].split("\n\nPOST:", 1)[0]
        post = text.split("\n\nPOST:", 1)[1].rsplit("TL;DR:", 1)[0]
    except IndexError:
        raise ValueError(f"not a TL;DR query: {text[:80]!r}") from None
    return title.strip(), post.strip()


class CorpusIndex:
    """The corpus' SFT rows (train, validation, test), found from a decoded query: the same title, and a post that
    starts with the query's (smart truncation keeps the post's opening)."""

    def __init__(self, data_dir: str):
        self.by_title: dict[str, list[dict]] = {}
        for split in ("train", "validation", "test"):
            for row in tldr_synth.read_jsonl(os.path.join(data_dir, "sft", f"{split}.jsonl")):
                self.by_title.setdefault(row["title"].strip(), []).append(row)

    def find(self, query_text: str) -> dict:
        title, post = split_query(query_text)
        rows = [r for r in self.by_title.get(title, []) if r["post"].strip().startswith(post)]
        if len(rows) != 1:
            raise KeyError(f"{len(rows)} posts of the corpus match the query {query_text[:80]!r}: need exactly one")
        return rows[0]


def gold_get_score(tokenizer, index: CorpusIndex):
    """A drop-in for `ppo_tldr.get_score` that returns the gold score of each response (B,)."""

    def get_score(reward_model, query_responses: torch.Tensor, pad_token_id: int, context_length: int):
        scores = []
        for row in query_responses.tolist():
            query = tokenizer.decode([t for t in row[:context_length] if t != pad_token_id], skip_special_tokens=True)
            response = tokenizer.decode([t for t in row[context_length:] if t != pad_token_id],
                                        skip_special_tokens=True)
            scores.append(tldr_synth.gold_score(index.find(query), response))
        return torch.tensor(scores, dtype=torch.float32, device=query_responses.device)

    return get_score


def main(argv: list[str]) -> None:
    import tyro

    import ppo_tldr

    if "--data_dir" not in argv:
        raise SystemExit("usage: python benchmark/offline/gold_reward_ppo.py --data_dir DATA_DIR <ppo_tldr.py flags>")
    i = argv.index("--data_dir")
    data_dir, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    args = tyro.cli(ppo_tldr.Args, args=argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.sft_model_path)
    ppo_tldr.get_score = gold_get_score(tokenizer, CorpusIndex(data_dir))
    ppo_tldr.main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
