"""The commands and snippets README.md tells a user to run, read from the README itself, so a test that runs
one fails when the README changes it (not a copy of the command kept in the test)."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
COMMENT = re.compile(r"\s+# .*$")  # a trailing "  # what it does"; no README command has " # " inside quotes


def readme() -> str:
    return (REPO / "README.md").read_text()


def blocks(text: str, lang: str) -> list[str]:
    """Bodies of the fenced blocks of one language (``bash``, ``python``, ``yaml``), in README order."""
    return [body for found, body in FENCE.findall(text) if found == lang]


def shell_commands(text: str) -> list[str]:
    """Every command line of the ``bash`` blocks: continuation lines joined, trailing comments and
    comment-only lines dropped."""
    out = []
    for body in blocks(text, "bash"):
        for line in re.sub(r"\\\n\s*", "", body).splitlines():
            line = COMMENT.sub("", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def study_commands(text: str) -> list[str]:
    """The first column of the Studies table: one `cmr ... study NAME` per row."""
    return re.findall(r"^\| `(cmr [^`]*study [^`]*)` \|", text, re.M)


def python_snippet(text: str, section: str) -> str:
    """The first ``python`` block after the heading ``section`` (e.g. "## MLflow")."""
    start = text.index(f"\n{section}\n")
    return blocks(text[start:], "python")[0]


def command(text: str, *parts: str) -> str:
    """The one README command that contains every one of ``parts``; fails when there is not exactly one,
    so a test notices a command that the README dropped or doubled."""
    found = [c for c in shell_commands(text) if all(part in c for part in parts)]
    assert len(found) == 1, f"README.md: {len(found)} commands contain {parts}: {found}"
    return found[0]


def as_run(cmd: str, bin_dir: Path) -> str:
    """The command for ``bash -c`` with the project's ``.venv/bin/`` replaced by the venv running the tests."""
    return cmd.replace(".venv/bin/", f"{bin_dir}/")


def mentions(path: Path) -> set[str]:
    """Test functions defined in a test file (to check that a test named by the audit exists)."""
    return set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
