"""The docs say what the project is and how to reproduce its figures, not how it was worked on:
every measurement table of BENCHMARKS.md names its machine, command, date and commit; every entry of
docs/findings.md is dated by date and commit; no doc narrates the project's work history."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"
FINDINGS = REPO / "docs" / "findings.md"
DOCS = [REPO / "README.md", REPO / "ARCHITECTURE.md", BENCHMARKS, *sorted((REPO / "docs").glob("*.md"))]

DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
COMMIT = re.compile(r"\b[0-9a-f]{7,40}\b")
FIELDS = ("Machine", "Command", "Date", "Commit")
SPEC_LINE = re.compile(r"^- \*\*(?P<field>\w+):\*\*\s*(?P<value>.*)$")
SUITE_BLOCK = re.compile(r"<!-- bench-suite (?P<kind>[\w-]+) -->\n(?P<body>.*?)<!-- /bench-suite (?P=kind) -->", re.S)

# Work-history narration removed from these docs; each pattern matches only that use (a pytest
# "session fixture" or a Ray session stays legitimate).
NARRATION = [
    r"\bthis session\b", r"\bother sessions?\b", r"\bprevious session\b", r"\bsessions? \d+\b",
    r"\bsessions so far\b", r"\blent to this\b", r"\bthis round\b", r"\bprevious runs\b", r"\bearlier runs\b",
    r"\bthe final code\b", r"\bfinal commit of\b", r"\bat the start of this\b", r"\bwe measured\b",
    r"\blast time\b",
]


def tables(text: str) -> list[tuple[str, str]]:
    """(first line, the text since the previous heading or table) of every markdown table."""
    out, since, in_table, fenced = [], [], False, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        is_row = line.startswith("|") and not fenced
        if is_row and not in_table:
            out.append((line, "\n".join(since)))
            since = []
        elif not is_row:
            if line.startswith("#") and not fenced:
                since = []
            else:
                since.append(line)
        in_table = is_row
    return out


def spec(preamble: str) -> dict[str, str]:
    """The `- **Field:** value` list above a table (continuation lines indented)."""
    fields, current = {}, None
    for line in preamble.splitlines():
        m = SPEC_LINE.match(line)
        if m:
            current = m["field"]
            fields[current] = m["value"]
        elif current and line.startswith("  ") and line.strip():
            fields[current] += " " + line.strip()
        else:
            current = None
    return fields


def known_commit():
    """A check that a hash names a commit of this repository, or None outside a full git clone."""
    if shutil.which("git") is None:
        return None
    p = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"], capture_output=True,
                       text=True)
    if p.returncode != 0 or p.stdout.strip() != "false":
        return None
    return lambda h: subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{h}^{{commit}}"],
                                    capture_output=True).returncode == 0


def _hand_written(text: str) -> str:
    return SUITE_BLOCK.sub("", text)


def test_every_benchmark_table_names_machine_command_date_commit():
    found = tables(_hand_written(BENCHMARKS.read_text()))
    assert len(found) >= 4, "BENCHMARKS.md lost its measurement tables"
    is_commit = known_commit()
    for first, preamble in found:
        s = spec(preamble)
        missing = [f for f in FIELDS if not s.get(f)]
        assert not missing, f"BENCHMARKS.md table {first[:60]!r}: no {missing} list above it (- **Field:** value)"
        assert re.search(r"\b\d+-core\b", s["Machine"]) and "GPU" in s["Machine"], \
            f"table {first[:60]!r}: Machine must give the CPU cores and the GPU (or 'no GPU'): {s['Machine']!r}"
        assert re.search(r"`[^`]+`", s["Command"]), f"table {first[:60]!r}: Command holds no `command`"
        assert DATE.search(s["Date"]), f"table {first[:60]!r}: Date is not YYYY-MM-DD: {s['Date']!r}"
        hashes = COMMIT.findall(s["Commit"])
        assert hashes, f"table {first[:60]!r}: Commit names no commit hash: {s['Commit']!r}"
        if is_commit is not None:
            unknown = [h for h in hashes if not is_commit(h)]
            assert not unknown, f"table {first[:60]!r}: {unknown} are not commits of this repository"


def test_generated_suite_blocks_keep_their_markers_and_say_where_and_how():
    text = BENCHMARKS.read_text()
    assert text.count("<!-- bench-suite gpu -->") == 1 and text.count("<!-- /bench-suite gpu -->") == 1
    for m in SUITE_BLOCK.finditer(text):
        if tables(m["body"]):  # the block the bench suite writes: "Measured <date> on <machine> ...; command `...`"
            assert re.search(r"Measured " + DATE.pattern + r".* on .+", m["body"]), m["kind"]
            assert re.search(r"command `[^`]+`", m["body"]), m["kind"]


def test_findings_entries_are_dated_by_date_and_commit():
    text = FINDINGS.read_text()
    entries = re.split(r"^## ", text, flags=re.M)[1:]
    assert len(entries) >= 10
    for entry in entries:
        title, _, body = entry.partition("\n")
        first = next(line for line in body.splitlines() if line.strip())
        assert DATE.search(first) and re.search(r"commits? " + COMMIT.pattern, first), \
            f"docs/findings.md '{title}': the first line must date it as 'YYYY-MM-DD, commit <hash>': {first!r}"
        assert not DATE.search(title), f"docs/findings.md '{title}': the date goes on the line below the title"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_do_not_narrate_work_history(doc):
    text = doc.read_text()
    hits = [(pat, m.group(0)) for pat in NARRATION for m in re.finditer(pat, text, re.I)]
    assert not hits, f"{doc.relative_to(REPO)} narrates the project's work history: {hits}; state the figure " \
                     "with its date and commit instead"


def test_the_narration_check_can_fail():
    """The patterns catch the phrases they were written for and spare the legitimate uses."""
    caught = "measured in session 16 on this session's machine, with other sessions' runs; the final code"
    assert sum(bool(re.search(p, caught, re.I)) for p in NARRATION) >= 4
    legit = "a pytest session fixture; Ray's /tmp/ray/session_latest logs; pass the folder of an earlier run"
    assert not [p for p in NARRATION if re.search(p, legit, re.I)]
    assert tables("## t\n\n- **Machine:** 2-core x, no GPU\n\n| a |\n|---|\n")[0][1].count("Machine") == 1
    assert "Date" not in spec(tables("- **Date:** 2026-01-01\n## h\n| a |\n")[0][1])
