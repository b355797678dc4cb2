"""The documentation a newcomer reads is kept true: every relative link resolves, every `xpnet ...`
command shown parses with today's CLI, every Python block runs, and the prose stays readable
(README.md under 200 lines, no sentence over 45 words)."""

import re
import shlex
from pathlib import Path

import pytest

import xpnet
from xpnet.cli import build_parser
from xpnet.data.synthetic import synthetic_splits

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCS, ROOT / "bench" / "README.md"]
MAX_WORDS = 45

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def blocks(path, language):
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def shown_commands(path):
    """Each `xpnet ...` line of the file's code blocks (continuation lines joined, comments cut)."""
    for _, body in FENCE.findall(path.read_text()):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("xpnet "):
                yield line


def prose(path):
    """The file's running text: code blocks, tables, headings and inline code taken out, one
    paragraph or list item per entry."""
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`]*`", "CODE", text)
    text = LINK.sub(lambda m: m.group(0).split("](")[0][1:], text)
    paragraphs, current = [], []
    for line in text.splitlines() + [""]:
        stripped = line.strip()
        new_item = re.match(r"^([-*]|\d+\.)\s", stripped)
        if not stripped or stripped.startswith(("#", "|", "<", "```")) or new_item:
            if current:
                paragraphs.append(" ".join(current))
            current = [re.sub(r"^([-*]|\d+\.)\s+", "", stripped)] if new_item else []
            continue
        current.append(stripped)
    return paragraphs


def sentences(paragraph):
    return [s for s in re.split(r"(?<=[.!?:;])\s+(?=[A-Z(`*])", paragraph) if s.strip()]


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    targets = [t for t in LINK.findall(path.read_text()) if not re.match(r"^[a-z]+:", t)]
    missing = [t for t in targets if not (path.parent / t.split("#", 1)[0]).exists()]
    assert missing == []


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_parses_with_the_cli(path):
    parser = build_parser()
    for command in shown_commands(path):
        try:
            args = parser.parse_args(shlex.split(command)[1:])
        except SystemExit as exc:
            pytest.fail(f"{path.name}: `{command}` does not parse (exit {exc.code})")
        assert args.command is not None, command


def test_the_docs_show_every_subcommand():
    shown = {shlex.split(c)[1] for path in LINKED for c in shown_commands(path)}
    assert shown == {"train", "evaluate", "predict", "verify", "bench", "data", "augment", "recipes"}


@pytest.mark.parametrize("path", [p for p in DOCS if blocks(p, "python")], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs(path, tmp_path, monkeypatch, capsys):
    """On a small generated dataset in place of MNIST, in a directory of its own (blocks save files)."""
    data = synthetic_splits(n_train=2_048, n_validation=100, n_test=100)
    monkeypatch.setattr(xpnet, "load_dataset", lambda *args, **kwargs: data)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for number, block in enumerate(blocks(path, "python")):
        exec(compile(block, f"{path.name}, Python block {number + 1}", "exec"), namespace)


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) < 200


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_sentence_runs_over_45_words(path):
    long = [s for p in prose(path) for s in sentences(p) if len(s.split()) > MAX_WORDS]
    assert long == [], f"{len(long)} sentences over {MAX_WORDS} words, the first: {long[0] if long else ''}"


def test_the_sentence_splitter_counts_what_a_reader_reads():
    paragraph = "One two three. Four five: six seven (eight). Nine `x.y` ten 0.5 eleven."
    assert [len(s.split()) for s in sentences(paragraph)] == [3, 5, 5]
    assert len(prose(README)) > 10


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_seed_means_only_a_random_seed(path):
    """The notebook xpnet began from is 'the original notebook', never 'the seed'."""
    assert re.findall(r"\bseed(?:'s)? (?:notebook|recipe)|\bthe seed\b", path.read_text(), re.IGNORECASE) == []
