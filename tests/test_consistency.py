"""Cross-file checks: helper copies shared by the stage scripts stay identical, and the docs stay true."""

import ast
import os
import re

import pytest

from conftest import ROOT

STAGES = ("sft_tldr.py", "reward_tldr.py", "ppo_tldr.py")
STAGE_SPECIFIC = {"Args", "Derived", "main", "derive", "evaluate"}  # same name, each stage's own logic


def top_level_functions(path: str) -> dict[str, str]:
    source = open(path).read()
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in STAGE_SPECIFIC}


def test_shared_helpers_are_identical_copies():
    """Repetition across the stage files is by design; drifting copies would make the stages disagree."""
    sources = {f: top_level_functions(os.path.join(ROOT, f)) for f in STAGES}
    shared = 0
    for name in set().union(*sources.values()):
        versions = {f: s[name] for f, s in sources.items() if name in s}
        if len(versions) > 1:
            shared += 1
            distinct = set(versions.values())
            assert len(distinct) == 1, f"{name} differs between {sorted(versions)}"
    assert shared >= 10  # the data pipeline, padding, truncation, logging: the check has something to check


PART2_START, SHARED_END = "# PART 2: PLUMBING.", "# ---- end of the shared plumbing"


def shared_plumbing(path: str) -> str:
    """The text of a stage file from its part-2 banner to the end of the shared plumbing block."""
    source = open(path).read()
    if source.count(PART2_START) != 1 or source.count(SHARED_END) != 1:
        raise AssertionError(f"{path}: needs one {PART2_START!r} banner and one {SHARED_END!r} line")
    return source[source.index(PART2_START) : source.index(SHARED_END)]


def test_part_2_shared_plumbing_is_byte_identical_and_below_the_training_loop():
    """Each stage reads as the algorithm first (part 1, up to train_*), then the plumbing (part 2), whose shared block
    is one text in all three files; a reader reads it once, and a fix lands in all three or the test fails."""
    blocks = {f: shared_plumbing(os.path.join(ROOT, f)) for f in STAGES}
    assert len(set(blocks.values())) == 1, "the shared plumbing block differs between the stage files"
    block = blocks[STAGES[0]]
    for name in ("class Logger", "def load_splits", "def save_state_atomic", "def resume_state", "def find_divergence"):
        assert f"\n{name}" in block
    for f in STAGES:
        source = open(os.path.join(ROOT, f)).read()
        train = source.index("\ndef train_")
        assert train < source.index(PART2_START) < source.index("\ndef main(")
    assert block.count("\n") > 400  # the check covers the bulk of the plumbing


STAGE_SPECIFIC_CONSTANTS = {"RESUMABLE_CHANGES"}  # the flags each stage lets a resumed run change


def top_level_constants(path: str) -> dict[str, str]:
    source = open(path).read()
    return {node.targets[0].id: ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id.isupper() and node.targets[0].id not in STAGE_SPECIFIC_CONSTANTS}


def test_shared_constants_are_identical_copies():
    """The constants the shared helpers read (file lists, limits, formats) are copied too, and must not drift."""
    sources = {f: top_level_constants(os.path.join(ROOT, f)) for f in STAGES}
    shared = [n for n in set().union(*sources.values()) if sum(n in s for s in sources.values()) > 1]
    for name in shared:
        versions = {f: s[name] for f, s in sources.items() if name in s}
        assert len(set(versions.values())) == 1, f"{name} differs between {sorted(versions)}"
    assert {"QUERY_FORMAT", "STATE_MANIFEST", "MANIFEST_HASH_LIMIT", "TOKENIZER_FILES", "RUN_OUTPUTS"} <= set(shared)


def test_query_format_is_the_same_in_every_stage():
    import ppo_tldr
    import reward_tldr
    import sft_tldr

    assert sft_tldr.QUERY_FORMAT == reward_tldr.QUERY_FORMAT == ppo_tldr.QUERY_FORMAT


@pytest.mark.parametrize("script", STAGES)
def test_importing_a_stage_does_no_work(script, tmp_path):
    """Importing a stage file must not touch the network, the disk or global state (tests and forks import them)."""
    import subprocess
    import sys

    code = f"import sys; sys.path.insert(0, {ROOT!r}); import {script[:-3]}; import os; print(sorted(os.listdir('.')))"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_the_names_benchmark_uses_from_ppo_tldr_are_its_documented_list():
    """benchmark/ scripts import and patch a few names of ppo_tldr.py; BENCHMARK_API lists exactly those, so a
    rename there is caught here rather than in a benchmark run."""
    import ppo_tldr

    used = set()
    paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(ROOT, "benchmark"))
                   for name in names)
    for path in paths:
        if not path.endswith(".py"):
            continue
        source = open(path).read()
        tree = ast.parse(source)
        # `ppo_tldr.<name>` anywhere, code strings run in a subprocess included (not the file name ppo_tldr.py)
        used |= set(re.findall(r"\bppo_tldr\.([A-Za-z_]\w*)", source)) - {"py"}
        aliases = {"ppo_tldr"} | {a.asname for node in ast.walk(tree) if isinstance(node, ast.Import)
                                  for a in node.names if a.name == "ppo_tldr" and a.asname}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "ppo_tldr":
                used |= {a.name for a in node.names}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                used.add(node.attr)
            elif ("def install(ppo" in source and isinstance(node, ast.Attribute)
                  and isinstance(node.value, ast.Name) and node.value.id == "ppo"):
                used.add(node.attr)  # install(ppo, ...) patches the module passed in
    assert used == set(ppo_tldr.BENCHMARK_API), (sorted(used - set(ppo_tldr.BENCHMARK_API)),
                                                 sorted(set(ppo_tldr.BENCHMARK_API) - used))
    assert all(hasattr(ppo_tldr, name) for name in ppo_tldr.BENCHMARK_API)
