"""The tutorial-first layout, measured: each stage's training loop sits in the first half of its file, and PPO's
update loop is mostly algorithm. `python tests/test_layout.py` prints the figures (README "How to read this
repository")."""

import ast
import io
import os
import re
import sys
import tokenize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT  # noqa: E402

STAGES = {"sft_tldr.py": "train_sft", "reward_tldr.py": "train_reward", "ppo_tldr.py": "train_ppo"}
PART2_START, SHARED_END = "# PART 2: PLUMBING.", "# ---- end of the shared plumbing"

# A statement of the update loop is plumbing when it times, logs, checks health, checks divergence, saves or
# reports progress; everything else (sampling, scoring, masks, rewards, GAE, losses, optimizer steps) is algorithm.
PLUMBING = re.compile(r"device_time\(|time\.time\(|\btime_\w+|\bt0\b|\bclock\b|\blogger\b|\bmetrics\b|\bmonitor\b|"
                      r"\bhealth_update\b|\btripped\b|record_incident|roll_back|safe_point|\bprogress\b|"
                      r"stop_if_diverged|write_probe_table|\bstats\b|first_minibatch_max_diff|episodes_per_second|"
                      r"\btexts\b|last_state|kept_update|\bstates\.|\bbook\.|\brollout = dict\b")


def code_lines(source: str) -> set[int]:
    """Line numbers holding code: not blank, not only a comment."""
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def training_loop(tree: ast.Module, train_name: str) -> ast.For | ast.While:
    """The stage's training loop: the longest `for` or `while` loop of its train_* function."""
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == train_name)
    loops = [n for n in ast.walk(train) if isinstance(n, (ast.For, ast.While))]
    return max(loops, key=lambda n: n.end_lineno - n.lineno)


def loop_composition(source: str, loop: ast.For | ast.While) -> tuple[int, int]:
    """(algorithm lines, plumbing lines) of a loop's body: code lines of each simple statement, and the header
    lines of compound ones, by the PLUMBING pattern of that statement's text (a compound statement whose header is
    plumbing is plumbing whole)."""
    code = code_lines(source)
    algorithm, plumbing = set(), set()

    def visit(stmts):
        for s in stmts:
            body_fields = [f for f in ("body", "orelse", "finalbody", "handlers") if getattr(s, f, None)]
            if isinstance(s, (ast.For, ast.While, ast.If, ast.With)):
                header_end = s.body[0].lineno - 1
                header = set(range(s.lineno, header_end + 1)) & code
                header_text = "\n".join(source.splitlines()[s.lineno - 1 : header_end])
                if PLUMBING.search(header_text):
                    plumbing.update(set(range(s.lineno, s.end_lineno + 1)) & code)
                    continue
                algorithm.update(header)
                for f in body_fields:
                    visit(getattr(s, f))
            else:
                lines = set(range(s.lineno, s.end_lineno + 1)) & code
                (plumbing if PLUMBING.search(ast.get_source_segment(source, s)) else algorithm).update(lines)

    visit(loop.body)
    return len(algorithm), len(plumbing)


def layout(path: str, train_name: str) -> dict:
    source = open(path).read()
    tree = ast.parse(source)
    loop = training_loop(tree, train_name)
    total = source.count("\n")
    part2 = source.index(PART2_START)
    shared = source[part2 : source.index(SHARED_END)]
    algorithm, plumbing = loop_composition(source, loop)
    return {"loop_line": loop.lineno, "total_lines": total, "part2_line": source[:part2].count("\n") + 1,
            "part2_lines": total - source[:part2].count("\n"), "shared_lines": shared.count("\n"),
            "loop_algorithm": algorithm, "loop_plumbing": plumbing, "loop_share": algorithm / (algorithm + plumbing)}


def test_each_training_loop_starts_in_the_first_half_of_its_file():
    for name, train_name in STAGES.items():
        figures = layout(os.path.join(ROOT, name), train_name)
        assert figures["loop_line"] < figures["total_lines"] / 2, (name, figures)


def test_the_ppo_update_loop_is_mostly_algorithm():
    figures = layout(os.path.join(ROOT, "ppo_tldr.py"), "train_ppo")
    assert figures["loop_share"] >= 0.85, figures


def test_the_composition_count_tells_plumbing_from_algorithm():
    source = ("def train_x():\n"
              "    for step in range(3):\n"
              "        t0 = device_time()\n"
              "        loss = model(batch)  # algorithm\n"
              "\n"
              "        loss.backward()\n"
              "        if tripped:\n"
              "            roll_back(1)\n"
              "            break\n"
              "        logger.log({'loss': loss},\n"
              "                   step)\n")
    loop = training_loop(ast.parse(source), "train_x")
    assert loop_composition(source, loop) == (2, 6)  # the if block whole (3), the timer (1), the log call (2)


if __name__ == "__main__":
    print("| file | training loop starts at line | part 2 | of which the shared block | loop body: algorithm lines |")
    print("|---|---|---|---|---|")
    for name, train_name in STAGES.items():
        f = layout(os.path.join(ROOT, name), train_name)
        print(f"| `{name}` | {f['loop_line']} of {f['total_lines']} ({f['loop_line'] / f['total_lines']:.0%}) | "
              f"from line {f['part2_line']}, {f['part2_lines']} lines | {f['shared_lines']} lines, checked byte for byte | "
              f"{f['loop_algorithm']} of {f['loop_algorithm'] + f['loop_plumbing']} ({f['loop_share']:.0%}) |")
