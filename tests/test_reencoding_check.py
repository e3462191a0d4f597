"""benchmark/perf/reencoding_check.py: the reference's decode -> clean-up -> re-encode against token concatenation."""

import reencoding_check as R
import sft_tldr
from conftest import comparison_rows, sft_rows


def test_the_cleanup_is_counted_where_it_changes_the_query_and_its_ids(tiny_model):
    tokenizer = sft_tldr.load_tokenizer(tiny_model)
    clean = sft_rows(3, 1)
    spaced = [dict(r, post=r["post"] + " my mom 's car broke . what should i do ?") for r in sft_rows(2, 5)]
    counts = R.count_rows(tokenizer, clean + spaced)
    assert [counts[k] for k in ("rows", "cleanup", "ids_with_cleanup", "ids_without_cleanup")] == [5, 2, 2, 0]
    assert R.clean_up_tokenization("mom 's car . ok ?") == "mom's car. ok?"
    pairs = comparison_rows(2, 10)
    pairs[1]["info"]["post"] += " i can 't , really"  # " ," is cleaned; " 't" is not in the rule
    assert R.count_rows(tokenizer, pairs)["cleanup"] == 1
