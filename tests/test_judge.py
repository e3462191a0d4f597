"""The LLM judge (benchmark/paper/judge.py) against a small chat-completions server on 127.0.0.1: answers, malformed
answers, HTTP errors and retries, concurrency, the resumable cache, the A/B order and the win-rate math."""

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

import judge

# The prompt as the checklist prints it [N+ 1.F.5]; the reference code sends the same with a leading newline and
# a backslash + newline after "explaining which".
CHECKLIST_PROMPT = """Which of the following summaries does a better job of summarizing the most important points in the given forum post, without including unimportant or irrelevant details? Judge based on accuracy, coverage, and coherence.

### Post:
{post}

### Summary A:
{A}

### Summary B:
{B}

### Instructions:
FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">
"""

FAST = dict(backoff_base=0.001, backoff_max=0.005, timeout=5.0)  # keep the back-off tiny in tests


# ---------------------------------------------------------------------------------------------------------
# A fake OpenAI-compatible server
# ---------------------------------------------------------------------------------------------------------


def summaries(prompt: str) -> tuple[str, str]:
    a = re.search(r"### Summary A:\n(.*?)\n\n### Summary B:", prompt, re.S).group(1)
    b = re.search(r"### Summary B:\n(.*?)\n\n### Instructions:", prompt, re.S).group(1)
    return a, b


def good_letter(prompt: str) -> str:
    """The fake judge prefers the summary containing GOOD."""
    a, _ = summaries(prompt)
    return "A" if "GOOD" in a else "B"


def completion(text: str) -> dict:
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
            "content": text}, "finish_reason": "stop"}]}


class FakeServer:
    """`behaviour(prompt, nth request for this prompt, nth request overall)` -> (status, body dict or str, headers)."""

    def __init__(self, behaviour, delay: float = 0.0):
        self.behaviour, self.delay = behaviour, delay
        self.lock = threading.Lock()
        self.requests, self.per_prompt, self.inflight, self.max_inflight = 0, {}, 0, 0
        self.bodies = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with state.lock:
                    state.requests += 1
                    state.bodies.append((self.path, dict(self.headers), body))
                    prompt = body["messages"][-1]["content"]
                    k = state.per_prompt[prompt] = state.per_prompt.get(prompt, 0) + 1
                    n = state.requests
                    state.inflight += 1
                    state.max_inflight = max(state.max_inflight, state.inflight)
                try:
                    time.sleep(state.delay)
                    status, payload, headers = state.behaviour(prompt, k, n)
                    data = (json.dumps(payload) if isinstance(payload, dict) else payload).encode()
                    self.send_response(status)
                    for key, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with state.lock:
                        state.inflight -= 1

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(behaviour, delay=0.0):
        servers.append(FakeServer(behaviour, delay))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def correct(prompt, k, n):
    return 200, completion(f"Comparison: one is better.\nPreferred: {good_letter(prompt)}"), {}


def table(n: int = 12, ours_good: int = 9) -> pd.DataFrame:
    """Rows whose first `ours_good` model summaries contain GOOD (the fake judge's favourite)."""
    return pd.DataFrame({
        "id": [f"r{i}" for i in range(n)],
        "query": [f"SUBREDDIT: r/test\n\nTITLE: title {i}\n\nPOST: post {i}\n\nTL;DR: " for i in range(n)],
        "response": [f" {'GOOD' if i < ours_good else 'meh'} summary {i}" for i in range(n)],
        "reference": [f" {'meh' if i < ours_good else 'GOOD'} reference {i}<|endoftext|>" for i in range(n)],
    })


def run(server, df, cache_path=None, **kw):
    client = judge.Client(server.url, "judge-model", "test-key", **{**FAST, **kw.pop("client", {})})
    return judge.judge_table(df, client, judge.JudgementCache(cache_path), **{"concurrency": 4, **kw})


# ---------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------


def test_prompt_is_the_papers():
    clean = judge.build_prompt("POST", "SA", "SB", clean=True)
    assert clean == CHECKLIST_PROMPT.format(post="POST", A="SA", B="SB")
    exact = judge.build_prompt("POST", "SA", "SB")
    assert exact.startswith("\nWhich of the following") and "explaining which \\\nyou prefer" in exact
    assert exact.lstrip("\n").replace("which \\\nyou", "which you") == clean
    # braces in a post are text, not placeholders
    assert "{summary_a} {}" in judge.build_prompt("{summary_a} {}", "a", "b")
    assert judge.SYSTEM_MESSAGE == "You are a helpful assistant."
    assert judge.clean_reference(" the ref <|endoftext|>[PAD]") == "the ref"


@pytest.mark.parametrize("answer,letter", [
    ("Comparison: x.\nPreferred: A", "A"),
    ("Comparison: x.\nPreferred: B\n", "B"),
    ('Comparison: x.\nPreferred: "A"', "A"),
    ("Comparison: x\npreferred:   b.", "B"),
    ("**Comparison:** x\n**Preferred:** **B**", "B"),
    ("Preferred: Summary A", "A"),
    ("Preferred: <A>", "A"),
    ("Preferred:\n\nB", "B"),
    ('Comparison: the format says Preferred: <"A" or "B">\nPreferred: B', "B"),  # the last one counts
    ('Comparison: x\nPreferred: <"A" or "B">', None),  # the echoed format line is not an answer
    ("Comparison: A is better.", None),  # no Preferred:
    ("Preferred: C", None),
    ("Preferred: both", None),
    ("asdfgh", None),
    ("", None),
    (None, None),
])
def test_parse_preferred(answer, letter):
    assert judge.parse_preferred(answer) == letter


def test_ab_order_is_reproducible_and_balanced():
    orders = [judge.ab_order(7, i) for i in range(400)]
    assert orders == [judge.ab_order(7, i) for i in range(400)]
    assert set(orders) == set(judge.ORDERS)
    assert 150 < orders.count("ours_first") < 250
    assert orders != [judge.ab_order(8, i) for i in range(400)]
    assert judge.preferred_label("A", "ours_first") == "ours" == judge.preferred_label("B", "reference_first")
    assert judge.preferred_label("B", "ours_first") == "reference" == judge.preferred_label("A", "reference_first")
    assert judge.preferred_label(None, "ours_first") == "invalid"


def test_win_rate_and_wilson_interval():
    low, high = judge.wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)  # the textbook value for 5/10
    low, high = judge.wilson_interval(0, 20)
    assert low == pytest.approx(0.0, abs=1e-12) and 0.15 < high < 0.17  # 0/20: [0, 0.161]
    assert all(math.isnan(x) for x in judge.wilson_interval(0, 0))
    s = judge.win_rate_summary(["ours"] * 6 + ["reference"] * 2 + ["invalid"] * 2)
    assert (s["n_rows"], s["n_valid"], s["ours"], s["reference"], s["invalid"]) == (10, 8, 6, 2, 2)
    assert s["win_rate"] == 0.75
    assert (s["ci95_low"], s["ci95_high"]) == judge.wilson_interval(6, 8)
    assert s["ci95_low"] < 0.75 < s["ci95_high"]
    assert math.isnan(judge.win_rate_summary(["invalid"])["win_rate"])
    assert judge.backoff_delay(0, 1.0, 60, 1.0) == 1.0 and judge.backoff_delay(10, 1.0, 60, 1.0) == 60
    assert judge.backoff_delay(0, 1.0, 60, 0.0) == 0.5 and judge.backoff_delay(0, 1.0, 60, 0.0, retry_after=5) == 5


# ---------------------------------------------------------------------------------------------------------
# Against the server
# ---------------------------------------------------------------------------------------------------------


def test_correct_answers_give_the_right_win_rate(serve):
    server = serve(correct)
    df, s = run(server, table(12, 9), seed=3)
    assert list(df["preferred"]) == ["ours"] * 9 + ["reference"] * 3
    assert s["win_rate"] == 0.75 and s["n_valid"] == 12 and s["requests"] == server.requests == 12
    assert list(df["order"]) == [judge.ab_order(3, i) for i in range(12)]
    assert set(df["order"]) == set(judge.ORDERS)  # both orders were sent
    assert set(df.columns) >= {"query", "response", "reference", "preferred", "judge_answer", "order"}
    path, headers, body = server.bodies[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer test-key"
    assert body["model"] == "judge-model" and "temperature" not in body  # the API's default, as the reference
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    # post and summaries stripped, the reference cut at EOS, in the row's order
    pair = ("GOOD summary 0", "meh reference 0")
    a, b = pair if judge.ab_order(3, 0) == "ours_first" else pair[::-1]
    expected = judge.build_prompt("SUBREDDIT: r/test\n\nTITLE: title 0\n\nPOST: post 0\n\nTL;DR:", a, b)
    assert expected in {b["messages"][1]["content"] for _, _, b in server.bodies}


def test_malformed_answers_are_retried_then_counted(serve):
    def behaviour(prompt, k, n):
        if "summary 0" in prompt or "summary 1" in prompt:  # never readable
            return 200, completion(["no verdict here", "Preferred: maybe", "%%%garbage"][k % 3]), {}
        if "summary 2" in prompt and k == 1:  # readable on the second try
            return 200, completion("Comparison: hmm."), {}
        return correct(prompt, k, n)

    server = serve(behaviour)
    df, s = run(server, table(8, 8), invalid_retries=2)
    assert list(df["preferred"]) == ["invalid", "invalid"] + ["ours"] * 6
    assert list(df["judge_attempts"]) == [3, 3, 2, 1, 1, 1, 1, 1]
    assert (s["unparseable_answers"], s["failed_requests"], s["n_valid"], s["win_rate"]) == (2, 0, 6, 1.0)
    assert server.requests == 3 + 3 + 2 + 5
    # the reference's rule: a random choice for the two unreadable rows, reproducible from the seed
    picks = [run(server, table(8, 8), invalid_retries=0, on_unparseable="random", seed=seed)
             for seed in (5, 5, 6, 7, 8, 9)]
    assert all(p[1]["unparseable_answers"] >= 2 and p[1]["invalid"] == 0 for p in picks)
    assert list(picks[0][0]["preferred"][:2]) == list(picks[1][0]["preferred"][:2])
    assert {x for p in picks for x in p[0]["preferred"][:2]} == {"ours", "reference"}


def test_http_500_429_and_timeouts_are_retried(serve):
    def behaviour(prompt, k, n):
        if k == 1 and "summary 0" in prompt:
            return 500, "internal error", {}
        if k == 1 and "summary 1" in prompt:
            return 429, {"error": {"message": "rate limit"}}, {"Retry-After": "0"}
        if k == 1 and "summary 2" in prompt:
            return 503, "overloaded", {}
        if k == 1 and "summary 3" in prompt:
            return 200, "{not json", {}  # a broken 200 is retried too
        if k == 1 and "summary 4" in prompt:
            time.sleep(0.6)  # longer than the client's timeout
        return correct(prompt, k, n)

    server = serve(behaviour)
    df, s = run(server, table(6, 6), client={"timeout": 0.3})
    assert list(df["preferred"]) == ["ours"] * 6 and s["failed_requests"] == 0
    assert server.requests == 6 + 5


def test_a_server_that_always_fails_gives_up_cleanly(serve, tmp_path):
    server = serve(lambda prompt, k, n: (500, "down", {}))
    cache = tmp_path / "cache.jsonl"
    start = time.time()
    df, s = run(server, table(5), cache_path=str(cache), client={"max_retries": 3})
    assert time.time() - start < 10
    assert list(df["preferred"]) == ["invalid"] * 5 and all("gave up after 4 attempts" in e for e in df["judge_error"])
    assert (s["failed_requests"], s["unparseable_answers"], s["n_valid"]) == (5, 0, 0) and math.isnan(s["win_rate"])
    assert server.requests == 5 * 4
    assert not cache.exists() or cache.read_text() == ""  # failures are not cached: the next run asks again
    # nothing listening at all
    server.close()
    df, s = run(server, table(2), client={"max_retries": 1})
    assert s["failed_requests"] == 2


def test_a_wrong_key_stops_the_run(serve):
    server = serve(lambda prompt, k, n: (401, {"error": {"message": "bad key"}}, {}))
    with pytest.raises(judge.FatalAPIError, match="401"):
        run(server, table(20), concurrency=2)
    assert server.requests < 20


def test_bounded_concurrency(serve):
    server = serve(correct, delay=0.05)
    _, s = run(server, table(16), concurrency=4)
    assert s["n_valid"] == 16 and 2 <= server.max_inflight <= 4
    server = serve(correct, delay=0.01)
    run(server, table(6), concurrency=1)
    assert server.max_inflight == 1


def test_cache_resumes_and_survives_a_torn_line(serve, tmp_path):
    server = serve(correct)
    cache = tmp_path / "judge_cache.jsonl"
    run(server, table(10).head(4), cache_path=str(cache))  # an interrupted run: 4 rows done
    assert server.requests == 4 and len(cache.read_text().splitlines()) == 4
    with open(cache, "a") as f:
        f.write('{"key": "torn')  # a crash in the middle of a line
    df, s = run(server, table(10), cache_path=str(cache))
    assert server.requests == 10 and s["cached_rows"] == 4  # only the 6 missing rows were asked
    df2, s2 = run(server, table(10), cache_path=str(cache))
    assert server.requests == 10 and s2["requests"] == 0 and s2["cached_rows"] == 10  # zero requests
    assert list(df2["preferred"]) == list(df["preferred"])
    assert judge.JudgementCache(str(cache)).skipped_lines == 1


def test_command_line(serve, tmp_path, capsys):
    server = serve(correct)
    path = tmp_path / "validation_table.csv"
    t = table(6, 3)
    t.loc[5, "response"] = ""  # an empty summary stays "", not NaN
    t.to_csv(path, index=False)
    summary = judge.main([str(path), "--base_url", server.url, "--api_key", "k", "--model", "m", "--concurrency", "2",
                          "--backoff_base", "0.001", "--backoff_max", "0.01"])
    judged = pd.read_csv(tmp_path / "validation_table_judged.csv", keep_default_na=False)
    assert list(judged["preferred"]) == ["ours"] * 3 + ["reference"] * 3
    assert json.loads((tmp_path / "validation_table_judged.json").read_text())["win_rate"] == summary["win_rate"] == 0.5
    assert (tmp_path / "validation_table_judge_cache.jsonl").exists()
    assert "win rate 0.5000" in capsys.readouterr().out
