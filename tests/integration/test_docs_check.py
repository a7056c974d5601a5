"""`scripts/docs_check.sh` (issue 17): the snippets of README.md and docs/*.md marked `<!-- docs-check -->` run
as written. The full run installs a fresh environment and takes many minutes, so it is marked slow (and `docs`):
`pytest -m docs` or `bash scripts/docs_check.sh`. The fast tests below check the markers and the runner."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import offline_env

ROOT = Path(__file__).resolve().parents[2]


def load_runner():
    spec = importlib.util.spec_from_file_location("docs_check", ROOT / "scripts" / "docs_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_readme_install_test_and_sample_commands_are_marked_runnable():
    proc = subprocess.run(["bash", "scripts/docs_check.sh", "--list"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("[1] README.md:") and "python3 -m venv .venv" in (ROOT / "README.md").read_text()
    readme = [line for line in lines if " README.md:" in line]
    assert any("# install" in line for line in readme), readme  # install + `bash scripts/test.sh`
    assert any("duodiff sample -n 4 --out synthetic --preview synthetic/preview.png" in line for line in readme)
    blocks = load_runner().find_blocks(ROOT / "README.md")
    assert "bash scripts/test.sh" in blocks[0].code and "pip install torch==2.13.0" in blocks[0].code
    assert any(line.startswith("[") and " docs/" in line for line in lines)  # docs/*.md have runnable blocks too


def test_markers_options_and_mistakes(tmp_path):
    runner = load_runner()
    doc = tmp_path / "doc.md"
    doc.write_text('text\n<!-- docs-check -->\n```bash\necho hi\n```\n\n```python\nnot marked\n```\n'
                   '<!-- docs-check env: A=1 B="x y" -->\n```python\nprint(1)\n```\n')
    blocks = runner.find_blocks(doc)
    assert [(b.line, b.kind, b.code, b.env) for b in blocks] == [
        (3, "bash", "echo hi\n", {}), (11, "python", "print(1)\n", {"A": "1", "B": "x y"})]
    doc.write_text("<!-- docs-check -->\n\n```bash\necho hi\n```\n")  # a marker must touch its block
    with pytest.raises(SystemExit, match="must be followed directly by a ```bash or ```python block"):
        runner.find_blocks(doc)
    doc.write_text("<!-- docs-check steps: 2 -->\n```bash\necho hi\n```\n")
    with pytest.raises(SystemExit, match="unknown marker option"):
        runner.find_blocks(doc)
    doc.write_text("<!-- docs-check env: 2X=1 -->\n```bash\necho hi\n```\n")
    with pytest.raises(SystemExit, match="NAME=value"):
        runner.find_blocks(doc)


def test_a_failing_block_fails_the_check(tmp_path):
    runner = load_runner()
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- docs-check -->\n```bash\ntrue\nfalse\necho never\n```\n"
                   "<!-- docs-check env: GREETING=hello -->\n```bash\ntest \"$GREETING\" = hello\n```\n")
    blocks = runner.find_blocks(doc)
    scripts = tmp_path / "blocks"
    scripts.mkdir()
    results = [runner.run_block(b, n, tmp_path, scripts, False, 60) for n, b in enumerate(blocks, 1)]
    assert [ok for ok, _ in results] == [False, True]  # bash -e: a failing line fails its block
    assert not runner.run_block(blocks[1], 3, tmp_path, scripts, True, 60)[0]  # --as-written drops env:


@pytest.mark.slow
@pytest.mark.docs
@pytest.mark.timeout(7200)
def test_every_marked_snippet_runs():
    """The whole check, in a fresh copy of the working tree with its own environment (many minutes)."""
    proc = subprocess.run(["bash", "scripts/docs_check.sh"], cwd=ROOT, capture_output=True, text=True,
                          env=offline_env(), timeout=7000)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert " 0 failed" in proc.stdout.strip().splitlines()[-1]
