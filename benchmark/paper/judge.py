"""LLM judge: win rate of a model's summaries against the human reference summaries [N+ 1.F.5].

Reads an evaluation table (`{split}_table.csv` of sft_tldr.py or ppo_tldr.py; columns query, response, reference),
asks a chat model which of the two summaries is better with the paper's prompt, and reports the fraction of rows
where it prefers ours, with a 95% Wilson interval. Any OpenAI-compatible `/chat/completions` endpoint works: the
paper's judge `gpt-3.5-turbo-0125`, or a local vLLM server (`--base_url http://localhost:8000/v1`).

    export OPENAI_API_KEY=...
    python benchmark/paper/judge.py models/pythia-1b/policy_44413/validation_table.csv         # every row, as the paper
    python benchmark/paper/judge.py runs/sft/validation_table.csv --n 200 --concurrency 8
    python benchmark/paper/judge.py table.csv --base_url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct

Writes `<table>_judged.csv` (the table plus `preferred` in {ours, reference, invalid}, `judge_answer`, `order`,
`judge_attempts`, `judge_error`) and `<table>_judged.json` (the summary, also printed).

As the reference (eval/oai.py) [N+ 1.F.5]:
  * system message "You are a helpful assistant.", the user message is the reference's template byte for byte:
    it starts with a newline and keeps a stray backslash + newline after "explaining which" (a line continuation
    that a raw string keeps). The checklist renders the same text without those two; `--clean_prompt` sends that;
  * post = the query `.strip()`-ped; our summary `.strip()`-ped; the reference summary cut at `<|endoftext|>` and
    `.strip()`-ped;
  * the A/B order is random per example; no sampling parameters are set (the API's defaults).
Where it deliberately differs:
  * the order is reproducible: `random.Random(f"{seed}:{index}")` decides it per row, so it depends neither on the
    thread schedule nor on --n;
  * parsing: the reference compared the text after "Preferred:" with "A" exactly, so `"A"` or `A.` counted as a win
    for the reference summary, and without "Comparison:"/"Preferred:" it drew A or B at random. Here the last
    "Preferred:" is read with quotes, brackets, markdown, case and a "Summary" prefix tolerated. An answer that is
    still unreadable is asked again (`--invalid_retries` more times, a fresh sample); if it stays unreadable the
    row is `invalid`: excluded from the win rate and counted. `--on_unparseable random` restores the reference's
    random choice (drawn from the row's seed, so it is reproducible);
  * API errors: the reference slept 30 s and retried forever. Here 429, 408, 409, 5xx, timeouts and broken
    connections are retried with exponential back-off and jitter (honouring Retry-After) up to `--max_retries`
    times; then the row is `invalid` with `judge_error` set, counted as a failed request and retried on the next
    run. 401/403/404 stop the whole run (a wrong key, model or URL would fail every row);
  * concurrency is a thread pool of `--concurrency` requests (the reference: 11 for gpt-3.5, 13 for gpt-4);
  * judgements are cached in a JSONL file keyed by sha256(model, system message, prompt), one line appended and
    fsync-ed per row as it finishes: an interrupted run resumes where it stopped, and a finished one re-run makes no
    request. Failed requests are not cached.
"""

import argparse
import concurrent.futures
import hashlib
import http.client
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-3.5-turbo-0125"  # the paper's judge [N+ 1.F.5]
SYSTEM_MESSAGE = "You are a helpful assistant."

# The reference's template (eval/oai.py), byte for byte: the leading newline and the backslash + newline after
# "explaining which" were sent to the judge in the paper's runs [N+ 1.F.5].
REFERENCE_TEMPLATE = (
    "\nWhich of the following summaries does a better job of summarizing the most important points in the given "
    "forum post, without including unimportant or irrelevant details? Judge based on accuracy, coverage, and "
    "coherence.\n\n### Post:\n{post}\n\n### Summary A:\n{summary_a}\n\n### Summary B:\n{summary_b}\n\n"
    "### Instructions:\nFIRST provide a one-sentence comparison of the two summaries, explaining which \\\n"
    "you prefer and why. SECOND, on a new line, state only \"A\" or \"B\" to indicate your choice. Your response "
    "should use the format:\nComparison: <one-sentence comparison and explanation>\nPreferred: <\"A\" or \"B\">\n"
)
# The same text as the checklist prints it (`--clean_prompt`): no leading newline, no stray backslash.
CLEAN_TEMPLATE = REFERENCE_TEMPLATE.lstrip("\n").replace("which \\\nyou", "which you")

ORDERS = ("ours_first", "reference_first")  # ours_first: our summary is A (the reference's shuffled_index 0)
RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
FATAL_STATUS = {401, 403, 404}  # a wrong key, model or URL: every request would fail


# ---------------------------------------------------------------------------------------------------------
# Pure helpers (tests import them)
# ---------------------------------------------------------------------------------------------------------


def clean_reference(text: str) -> str:
    """The reference summary as the reference judge saw it: cut at the first EOS string, stripped."""
    return text.split("<|endoftext|>")[0].strip()


def build_prompt(post: str, summary_a: str, summary_b: str, clean: bool = False) -> str:
    """The judge's user message. `str.format` fills the placeholders once, so braces in a post are safe."""
    return (CLEAN_TEMPLATE if clean else REFERENCE_TEMPLATE).format(post=post, summary_a=summary_a,
                                                                     summary_b=summary_b)


def ab_order(seed: int, index: int) -> str:
    """Which summary is A for row `index`: reproducible per (seed, row), both orders equally likely.

    Seeding `random.Random` with a string hashes it with SHA-512, so the draw is the same on every run and Python
    process (unlike `hash()`), and does not depend on which rows are judged or in what order."""
    return ORDERS[random.Random(f"{seed}:{index}").randint(0, 1)]


def parse_preferred(answer: Optional[str]) -> Optional[str]:
    """"A" or "B" from the text after the last "Preferred:", or None when it cannot be read.

    Tolerates case, whitespace, quotes, brackets, markdown emphasis, trailing punctuation and a "Summary"/"Option"
    prefix ("Preferred: **\"b\".**" -> "B"); rejects anything else, e.g. the echoed format line `<"A" or "B">`."""
    if not answer:
        return None
    parts = re.split(r"preferred\s*:", answer, flags=re.IGNORECASE)
    if len(parts) < 2:
        return None
    lines = [line.strip() for line in parts[-1].splitlines() if line.strip(" \t*_`")]
    if not lines:
        return None
    text = lines[0].strip(" \t*_`'\"“”‘’<>()[]{}.,;:!").lower()
    text = re.sub(r"^(summary|option)\s+", "", text).strip(" \t*_`'\"“”‘’<>()[]{}.,;:!")
    return text.upper() if text in ("a", "b") else None


def preferred_label(letter: Optional[str], order: str) -> str:
    """ours / reference from the judge's letter and the row's order; invalid without a letter."""
    if letter not in ("A", "B"):
        return "invalid"
    ours_letter = "A" if order == "ours_first" else "B"
    return "ours" if letter == ours_letter else "reference"


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion; (nan, nan) when n = 0."""
    if n == 0:
        return math.nan, math.nan
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def win_rate_summary(preferred: list[str]) -> dict:
    """Win rate of `ours` over the valid judgements (ours + reference) with its 95% Wilson interval.

    Invalid rows are excluded and counted: the judge said nothing usable about them, so counting them as losses (or
    as halves) would mix the judge's failures into the models' comparison."""
    ours, reference = preferred.count("ours"), preferred.count("reference")
    n = ours + reference
    low, high = wilson_interval(ours, n)
    return {"n_rows": len(preferred), "n_valid": n, "ours": ours, "reference": reference,
            "invalid": len(preferred) - n, "win_rate": ours / n if n else math.nan, "ci95_low": low, "ci95_high": high}


def cache_key(model: str, prompt: str) -> str:
    """What identifies a judgement: the judge model and the exact messages."""
    return hashlib.sha256(json.dumps([model, SYSTEM_MESSAGE, prompt]).encode()).hexdigest()


def backoff_delay(attempt: int, base: float, cap: float, jitter: float, retry_after: Optional[float] = None) -> float:
    """Seconds before retry `attempt` (0-based): base * 2^attempt, capped, times a jitter factor in [0.5, 1].

    A server's Retry-After raises the delay up to the cap; the jitter spreads the retries of concurrent requests."""
    delay = min(cap, base * 2 ** attempt) * (0.5 + 0.5 * jitter)
    if retry_after is not None:
        delay = max(delay, min(cap, retry_after))
    return delay


# ---------------------------------------------------------------------------------------------------------
# The chat completions client
# ---------------------------------------------------------------------------------------------------------


class RequestFailed(Exception):
    """One row's request gave up (retries spent, or an error that retrying cannot fix)."""


class FatalAPIError(Exception):
    """An error every request would hit (authentication, unknown model or URL): stop the run."""


@dataclass
class Client:
    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    api_key: Optional[str] = None
    timeout: float = 60.0
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    temperature: Optional[float] = None  # None = the API's default, as the reference
    max_tokens: Optional[int] = None

    def __post_init__(self):
        self.requests = 0  # HTTP requests sent, retries included
        self._lock = threading.Lock()
        self._rng = random.Random()  # back-off jitter only; no effect on results

    def _post(self, messages: list[dict]) -> str:
        body = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url.rstrip('/')}/chat/completions",
                                         data=json.dumps(body).encode(), headers=headers, method="POST")
        with self._lock:
            self.requests += 1
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            payload = json.loads(response.read().decode())
        content = payload["choices"][0]["message"]["content"]
        return content if isinstance(content, str) else ""

    def chat(self, prompt: str) -> str:
        """The judge's answer to one prompt, retrying transient failures with exponential back-off."""
        messages = [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt}]
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                return self._post(messages)
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code in FATAL_STATUS:
                    raise FatalAPIError(f"HTTP {e.code} from {self.base_url}: {detail}") from e
                if e.code not in RETRY_STATUS and e.code < 500:  # e.g. 400: this prompt is the problem
                    raise RequestFailed(f"HTTP {e.code}: {detail}") from e
                error = f"HTTP {e.code}: {detail}"
                try:
                    retry_after = float(e.headers.get("Retry-After", ""))
                except (TypeError, ValueError):
                    pass
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                    TimeoutError) as e:
                error = f"{type(e).__name__}: {e}"
            except (ValueError, KeyError, IndexError, TypeError) as e:  # a 200 whose body is not a completion
                error = f"malformed response: {type(e).__name__}: {e}"
            if attempt == self.max_retries:
                raise RequestFailed(f"gave up after {attempt + 1} attempts; last error {error}")
            with self._lock:
                jitter = self._rng.random()
            time.sleep(backoff_delay(attempt, self.backoff_base, self.backoff_max, jitter, retry_after))
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------
# The on-disk cache
# ---------------------------------------------------------------------------------------------------------


class JudgementCache:
    """JSONL of finished judgements, keyed by `cache_key`. One line per judgement, written with a single `write`
    on an append-mode file, flushed and fsync-ed before the next: a crash loses at most the line being written, and
    a torn last line is skipped when reading (and ended with a newline so the next line stays whole)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.skipped_lines = 0
        self._lock = threading.Lock()
        if not path or not os.path.exists(path):
            return
        with open(path, "rb") as f:
            data = f.read()
        for line in data.decode(errors="replace").splitlines():
            try:
                entry = json.loads(line)
                self.entries[entry["key"]] = entry
            except (ValueError, KeyError, TypeError):
                self.skipped_lines += int(bool(line.strip()))
        if data and not data.endswith(b"\n"):
            with open(path, "ab") as f:
                f.write(b"\n")

    def get(self, key: str) -> Optional[dict]:
        return self.entries.get(key)

    def add(self, entry: dict) -> None:
        with self._lock:
            self.entries[entry["key"]] = entry
            if not self.path:
                return
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------
# Judging a table
# ---------------------------------------------------------------------------------------------------------


def judge_row(client: Client, cache: JudgementCache, post: str, ours: str, reference: str, order: str,
              invalid_retries: int, clean_prompt: bool = False) -> dict:
    """Judge one row (or take it from the cache): {letter, answer, attempts, error, cached}."""
    summary_a, summary_b = (ours, reference) if order == "ours_first" else (reference, ours)
    prompt = build_prompt(post, summary_a, summary_b, clean_prompt)
    key = cache_key(client.model, prompt)
    cached = cache.get(key)
    if cached is not None:
        return {**cached, "cached": True, "error": ""}
    answer, letter = "", None
    for attempt in range(1, invalid_retries + 2):
        try:
            answer = client.chat(prompt)
        except RequestFailed as e:  # not cached: the next run asks again
            return {"letter": None, "answer": answer, "attempts": attempt, "error": str(e), "cached": False}
        letter = parse_preferred(answer)
        if letter is not None:
            break
    entry = {"key": key, "model": client.model, "letter": letter, "answer": answer, "attempts": attempt}
    cache.add(entry)
    return {**entry, "cached": False, "error": ""}


def judge_table(df, client: Client, cache: JudgementCache, seed: int = 0, concurrency: int = 8,
                invalid_retries: int = 2, on_unparseable: str = "invalid", clean_prompt: bool = False,
                progress: bool = False):
    """Judge every row of `df` (columns query, response, reference); returns (judged DataFrame, summary dict)."""
    missing = [c for c in ("query", "response", "reference") if c not in df.columns]
    if missing:
        raise ValueError(f"the table lacks columns {missing}; expected query, response, reference")
    df = df.reset_index(drop=True).copy()
    rows = [(i, str(q).strip(), str(r).strip(), clean_reference(str(ref)), ab_order(seed, i))
            for i, (q, r, ref) in enumerate(zip(df["query"], df["response"], df["reference"]))]
    results: list[Optional[dict]] = [None] * len(rows)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(judge_row, client, cache, post, ours, ref, order, invalid_retries, clean_prompt): i
                   for i, post, ours, ref, order in rows}
        try:
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                results[futures[future]] = future.result()
                if progress and (done % 50 == 0 or done == len(rows)):
                    print(f"judged {done}/{len(rows)} ({client.requests} requests)", file=sys.stderr, flush=True)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    preferred, unparseable = [], 0
    for (i, *_, order), result in zip(rows, results):
        letter = result["letter"]
        if letter is None and not result["error"]:
            unparseable += 1
            if on_unparseable == "random":  # the reference's rule, reproducible per row
                letter = random.Random(f"{seed}:{i}:unparseable").choice("AB")
        preferred.append(preferred_label(letter, order))
    df["preferred"] = preferred
    df["judge_answer"] = [r["answer"] for r in results]
    df["order"] = [row[-1] for row in rows]
    df["judge_attempts"] = [r["attempts"] for r in results]
    df["judge_error"] = [r["error"] for r in results]
    summary = win_rate_summary(preferred)
    summary.update({"unparseable_answers": unparseable, "failed_requests": sum(bool(r["error"]) for r in results),
                    "cached_rows": sum(r["cached"] for r in results), "requests": client.requests,
                    "model": client.model, "base_url": client.base_url, "seed": seed,
                    "on_unparseable": on_unparseable, "prompt": "clean" if clean_prompt else "reference"})
    return df, summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("table", help="evaluation table CSV with columns query, response, reference")
    p.add_argument("--base_url", default=DEFAULT_BASE_URL, help="OpenAI-compatible API root (…/v1)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="judge model (the paper: gpt-3.5-turbo-0125)")
    p.add_argument("--api_key", default=None, help="API key (default: $OPENAI_API_KEY; local servers need none)")
    p.add_argument("--n", type=int, default=-1, help="judge the first N rows; -1 = all (the paper)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-row A/B order")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--invalid_retries", type=int, default=2,
                   help="ask again this many times if an answer is unreadable")
    p.add_argument("--on_unparseable", choices=("invalid", "random"), default="invalid",
                   help="unreadable answers: excluded and counted (default) or a random A/B (the reference)")
    p.add_argument("--clean_prompt", action="store_true",
                   help="the checklist's prompt text instead of the reference's bytes")
    p.add_argument("--max_retries", type=int, default=6, help="retries of one request on 429/5xx/timeouts")
    p.add_argument("--backoff_base", type=float, default=1.0, help="first back-off in seconds, doubled per retry")
    p.add_argument("--backoff_max", type=float, default=60.0, help="longest back-off in seconds")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--temperature", type=float, default=None, help="judge sampling temperature (default: the API's)")
    p.add_argument("--max_tokens", type=int, default=None, help="cap on the judge's answer tokens (default: none)")
    p.add_argument("--cache", default=None, help="judgement cache JSONL (default: <table>_judge_cache.jsonl)")
    p.add_argument("--output", default=None, help="judged CSV (default: <table>_judged.csv, summary next to it)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import pandas as pd

    args = parse_args(argv)
    stem = args.table[:-4] if args.table.endswith(".csv") else args.table
    output = args.output or f"{stem}_judged.csv"
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key and args.base_url == DEFAULT_BASE_URL:
        raise SystemExit("set OPENAI_API_KEY or --api_key (or --base_url for a server that needs no key)")
    df = pd.read_csv(args.table, keep_default_na=False, lineterminator="\n")  # an empty response stays "", not NaN
    if args.n >= 0:
        df = df.head(args.n)
    client = Client(args.base_url, args.model, api_key, args.timeout, args.max_retries, args.backoff_base,
                    args.backoff_max, args.temperature, args.max_tokens)
    cache = JudgementCache(args.cache or f"{stem}_judge_cache.jsonl")
    try:
        judged, summary = judge_table(df, client, cache, args.seed, args.concurrency, args.invalid_retries,
                                      args.on_unparseable, args.clean_prompt, progress=True)
    except FatalAPIError as e:
        raise SystemExit(f"stopped: {e} (finished judgements are cached in {cache.path})")
    summary["table"] = args.table
    judged.to_csv(output, index=False)
    with open(output[:-4] + ".json" if output.endswith(".csv") else output + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"win rate {summary['win_rate']:.4f} (95% CI {summary['ci95_low']:.4f}-{summary['ci95_high']:.4f}) over "
          f"{summary['n_valid']} valid of {summary['n_rows']} rows; {summary['unparseable_answers']} unparseable "
          f"answers, {summary['failed_requests']} failed requests, {summary['requests']} requests made")
    print(json.dumps(summary, indent=2))
    print(f"wrote {output}")
    return summary


if __name__ == "__main__":
    main()
