"""Every command the README and docs/ show in their shell blocks runs as printed, as far as a
test without a mesh can tell: the program exists, `--help` works for each command and
subcommand named, and the arguments parse with the program's own parser. Make targets exist.

Recognized: `.venv/bin/onnxmesh ...` (or `onnxmesh ...`), `.venv/bin/python -m MODULE ...` (or
`python`/`python3`), `make TARGET`, and `grpcurl ...` (which `meshctl.grpcurl` must take as
printed); others (curl, kubectl, ...) are not ours.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs import cli as jobs_cli
from meshctl import cli, grpcurl
from meshctl.rollout import cli as rollout_cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SEPARATORS = {"&&", "||", "&", "|", ";", ">", ">>", "2>", "<"}
PYTHONS = {"python", "python3", ".venv/bin/python", "$(BIN)/python"}
ONNXMESH = {"onnxmesh", ".venv/bin/onnxmesh"}


def shell_blocks(path: Path) -> Iterator[str]:
    for block in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", path.read_text(), re.S):
        yield from block.replace("\\\n", " ").splitlines()


def commands(line: str) -> Iterator[list[str]]:
    """Each simple command of a shell line ($(...) substitutions included), as words."""
    for inner in re.findall(r"\$\(([^()]*)\)", line):
        yield from commands(inner)
    line = re.sub(r"\w+=\$\([^()]*\)", "", line)
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return
    current: list[str] = []
    for word in [*words, ";"]:
        if word in SEPARATORS:
            if current:
                yield current
            current = []
        elif not (not current and re.fullmatch(r"[A-Z_]+=\S*", word)):  # leading VAR=value
            current.append(word)


def ours() -> list[tuple[str, list[str]]]:
    found: dict[str, tuple[str, list[str]]] = {}
    for path in DOCS:
        for line in shell_blocks(path):
            for words in commands(line):
                if (
                    words[0] in ONNXMESH
                    or (words[0] in PYTHONS and words[1:2] == ["-m"])
                    or words[0] in ("make", "grpcurl")
                ):
                    found.setdefault(" ".join(words), (path.name, words))
    return sorted(found.values(), key=lambda item: item[1])


COMMANDS = ours()


def test_the_docs_show_commands_of_each_kind() -> None:
    kinds = {words[0] for _, words in COMMANDS}
    assert kinds >= {".venv/bin/onnxmesh", ".venv/bin/python", "make"}, kinds
    # What a new user pastes from the README must not need an activated venv.
    bare = [" ".join(w) for doc, w in COMMANDS if doc == "README.md" and w[0] in ("onnxmesh", "python")]
    assert not bare, f"README commands that only run in an activated venv: {bare}"


def exits_with_help(run: object, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        run(argv)  # type: ignore[operator]
    out = capsys.readouterr().out
    assert done.value.code == 0 and "usage:" in out, (argv, out)
    return out


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """The arguments as the program parses them (a placeholder like "$id" is just a string)."""
    parser.parse_args(argv)


@pytest.mark.parametrize(("doc", "words"), COMMANDS, ids=[" ".join(w)[:80] for _, w in COMMANDS])
def test_each_command_parses(doc: str, words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    if words[0] == "make":
        targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
        assert words[1] in targets, f"{doc}: make {words[1]}: no such target"
        return
    if words[0] == "grpcurl":  # the README runs these with meshctl.grpcurl where grpcurl is missing
        parse(grpcurl.build_parser(), words[1:])
        return
    if words[0] in ONNXMESH:
        argv = words[1:]
        command = argv[0]
        if command == "rollout":
            exits_with_help(cli.main, [command, argv[1], "--help"], capsys)
            parse(rollout_cli.build_parser(), argv[1:])
        elif command in jobs_cli.COMMANDS:
            exits_with_help(cli.main, [command, "--help"], capsys)
            parse(jobs_cli.build_parser(), argv)
        else:
            exits_with_help(cli.main, [command, "--help"], capsys)
            parse(cli.build_parser(), argv)
        return
    module, args = words[2], words[3:]
    shown = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0 and "usage:" in shown.stdout, f"{doc}: {module} --help: {shown.stderr}"
    build = getattr(importlib.import_module(module), "build_parser", None)
    if build is not None:
        parse(build(), args)
