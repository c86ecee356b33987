"""The docs site builds clean, the README stays a front page, and tables printed to a pipe stay whole."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from rich.table import Table

from twinfer.deploy.cli.report import new_console, print_predicted_beside_measured

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_mkdocs_build_strict(tmp_path):
    """mkdocs.yml over docs/: a broken link or anchor, a link out of docs/ or a page missing from
    `nav` is a warning, and --strict makes any warning fail the build."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner, not a warning of the build
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"mkdocs build --strict exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert not (ROOT / "site").exists(), "the docs are built under a temporary --site-dir, never into the repository"


# A markdown link's target, `[text](target)` or `[text](target "title")`; and a guide named in a code span.
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_GUIDE = re.compile(r"`(docs/[^`\s]+\.md)`")


def _local_target(target: str) -> str | None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith(("#", "//")):
        return None  # http(s), mailto and the like, or an anchor in the README itself
    return target.split("#", 1)[0] or None


def test_readme_is_a_front_page_whose_links_exist():
    text = README.read_text()
    lines = text.count("\n") + (not text.endswith("\n"))
    assert lines < 200, f"README.md has {lines} lines: guides belong under docs/"
    targets = [t for t in (_local_target(m) for m in _LINK.findall(text)) if t] + _GUIDE.findall(text)
    missing = sorted({t for t in targets if not (README.parent / t).exists()})
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_link_finder():
    text = 'see [a](docs/a.md), [b](docs/b.md#x "t"), [c](https://x.org), [d](#top), `docs/c.md` and `other.md`'
    found = [t for t in (_local_target(m) for m in _LINK.findall(text)) if t] + _GUIDE.findall(text)
    assert found == ["docs/a.md", "docs/b.md", "docs/c.md"]


def _wide_table() -> tuple[Table, list[str]]:
    header = [f"{name} latency predicted (seconds)" for name in ("crypten", "fss", "fss-compact")] + ["element-wise bytes online"]
    table = Table(title="a table wider than 80 columns", header_style="bold")
    for column in header:
        table.add_column(column)
    table.add_row("/encoder/layer.0/attention/self/query/MatMul", "0.123456789", "0.987654321", "123456789 bytes")
    return table, header


def test_a_wide_table_printed_to_a_pipe_stays_whole():
    table, header = _wide_table()
    stream = io.StringIO()  # not a terminal: rich's own default would be 80 columns and cut every cell
    new_console(file=stream).print(table)
    out = stream.getvalue()
    assert max(len(line) for line in out.splitlines()) > 80
    assert "…" not in out, out
    for text in [*header, "/encoder/layer.0/attention/self/query/MatMul", "123456789 bytes"]:
        assert text in out, f"{text!r} cut:\n{out}"


def test_report_tables_on_stdout_stay_whole(capsys, monkeypatch):
    """print_* in deploy/cli/report.py with no console of their own: stdout is captured, not a terminal."""
    monkeypatch.setenv("COLUMNS", "80")
    layer = "/encoder/layer.0/attention/self/query/MatMul"
    cmp = {
        "protocol": "crypten", "network": "rtt=40ms,bw=100mbit",
        "layers": [{"layer": layer, "op": "element-wise multiplication", "latency_s_predicted": 0.1, "latency_s_measured": 0.2,
                    "bytes_online_predicted": 1e8, "bytes_online_measured": 1e8, "rounds_predicted": 12, "rounds_measured": 12.0}],
        "total": {"latency_s_predicted": 1.0, "latency_s_measured": 1.5, "measured_over_predicted": 1.5,
                  "bytes_online_predicted": 1e9, "rounds_predicted": 100},
    }  # fmt: skip
    print_predicted_beside_measured(cmp)
    out = capsys.readouterr().out
    assert "…" not in out, out
    for text in (layer, "element-wise multiplication", "latency predicted", "latency measured", "1.5000 (1.50x predicted)"):
        assert text in out, f"{text!r} cut:\n{out}"
