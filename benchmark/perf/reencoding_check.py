"""How often the reference's re-encoding of decoded queries gives other token ids than the stages' concatenation.

The reference built its SFT and RM sequences as `encode(decode(query_token).strip() + response)` [N+ 1.A.8, 1.A.11],
and transformers 4.33 decoded with `clean_up_tokenization_spaces=True`, which rewrites " ." " ?" " !" " ," " ' "
" n't" " 'm" " 's" " 've" " 're" (the `clean_up_tokenization` rule, unchanged in transformers 5). The stages here
train on `query_token + response_token`. For every TL;DR row of an SFT or comparisons folder this counts

  cleanup             rows whose decoded query the clean-up changes (text only: the same for every tokenizer, up to
                      where smart truncation cuts the post)
  ids_with_cleanup    rows whose re-encoded sequence, clean-up on as in the reference, differs from the concatenation
  ids_without_cleanup the same with clean-up off: what a decode/encode round trip and merges across the
                      query/response boundary alone change

    python benchmark/perf/reencoding_check.py --tokenizer models/smollm2-135m \\
        data/tldr_synth/sft data/tldr_synth/comparisons
"""

import argparse
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import sft_tldr  # noqa: E402  (the stages' own query format, truncation and loading)


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of tokenization spaces (`PreTrainedTokenizerBase.clean_up_tokenization`)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


def sequence_differences(tokenizer, query_ids: list[int], responses: list[str]) -> Counter:
    """For one query and its responses (" text" each): which of the three counts this row adds to."""
    decoded = tokenizer.decode(query_ids, skip_special_tokens=True)
    counts = Counter(cleanup=int(clean_up_tokenization(decoded) != decoded))
    for key, query in (("ids_with_cleanup", clean_up_tokenization(decoded)), ("ids_without_cleanup", decoded)):
        counts[key] = int(any(
            tokenizer.encode(query.strip() + text, add_special_tokens=False)
            != query_ids + tokenizer.encode(text, add_special_tokens=False) for text in responses))
    return counts


def count_rows(tokenizer, rows, query_length: int = 512) -> Counter:
    """Counts over SFT rows (response " summary") or comparison rows (both summaries); CNN/DM rows are left out."""
    total = Counter()
    for row in rows:
        if "info" in row:  # a comparison
            info = row["info"]
            if not info.get("post"):
                continue
            query, responses = info, [s["text"] for s in row["summaries"]]
        else:
            query, responses = row, [" " + row["summary"]]
        total += sequence_differences(tokenizer, sft_tldr.truncated_query_tokens(tokenizer, query, query_length),
                                      responses)
        total["rows"] += 1
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", help="SFT or comparisons folders (one file per split)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder")
    args = parser.parse_args(argv)
    tokenizer = sft_tldr.load_tokenizer(args.tokenizer)
    for dataset in args.datasets:
        for split, ds in sft_tldr.load_splits(dataset).items():
            c = count_rows(tokenizer, ds)
            print(f"{dataset} {split}: {c['rows']} rows; clean-up changes the query of {c['cleanup']}; ids differ "
                  f"with clean-up {c['ids_with_cleanup']}, without {c['ids_without_cleanup']}")


if __name__ == "__main__":
    main()
