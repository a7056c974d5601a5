"""Runner of ``scripts/docs_check.sh`` (the marker convention and how blocks run are described there).

Standard library only: it starts before any environment is installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^\s*<!--\s*docs-check(?P<rest>.*?)-->\s*$")
FENCE = re.compile(r"^\s*```\s*(?P<lang>[\w+-]*)\s*$")
LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}


@dataclass
class Block:
    file: str
    line: int  # 1-based line of the opening fence
    kind: str  # "bash" or "python"
    code: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def parse_env(text: str, where: str) -> dict[str, str]:
    """``A=1 B="x y"`` -> ``{"A": "1", "B": "x y"}`` (shell words)."""
    env = {}
    for word in shlex.split(text):
        name, sep, value = word.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SystemExit(f"docs-check: {where}: env entries must look like NAME=value, got {word!r}")
        env[name] = value
    return env


def find_blocks(path: Path) -> list[Block]:
    """The marked blocks of one Markdown file, in order."""
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if not m:
            continue
        where = f"{rel}:{i + 1}"
        rest = m.group("rest").strip()
        env = {}
        if rest:
            key, sep, value = rest.partition(":")
            if key.strip() != "env" or not sep:
                raise SystemExit(f"docs-check: {where}: unknown marker option {rest!r}; use <!-- docs-check --> or "
                                 "<!-- docs-check env: NAME=value ... -->")
            env = parse_env(value, where)
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        kind = LANGUAGES.get(fence.group("lang")) if fence else None
        if kind is None:
            raise SystemExit(f"docs-check: {where}: the marker must be followed directly by a ```bash or ```python "
                             "block")
        end = next((j for j in range(i + 2, len(lines)) if re.fullmatch(r"\s*```\s*", lines[j])), None)
        if end is None:
            raise SystemExit(f"docs-check: {where}: the block is never closed")
        blocks.append(Block(rel, i + 2, kind, "\n".join(lines[i + 2:end]) + "\n", env))
    return blocks


def copy_tree(dest: Path) -> None:
    """The working tree as a fresh clone plus the current edits: tracked and untracked, not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if not src.is_file():  # deleted but still tracked
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)


def block_env(block: Block, repo: Path, as_written: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    venv = repo / ".venv"
    if (venv / "bin" / "python").exists():  # the environment the README's install block made
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.pop("PYTHONHOME", None)
    if not as_written:
        env.update(block.env)
    return env


def machine() -> str:
    """``"Intel(R) Xeon(R) ..., 2 cores"`` for the log."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def write_log(path: Path, blocks: list[Block], results: list[tuple[bool, float]], args: argparse.Namespace,
              started: str, load_start: str) -> None:
    """A Markdown record of the run: machine, threads, load, and each block's wall time."""
    lines = [
        "# docs check: the runnable snippets of README.md and docs/*.md",
        "",
        f"`bash scripts/docs_check.sh{' --as-written' if args.as_written else ''} --log {args.log}`, "
        f"started {started}; "
        f"{machine()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; 1-min / 5-min / 15-min load "
        f"average at the start {load_start}, at the end {load_average()}. Wall time per block, including starting "
        "Python and importing torch (what a user waits for).",
        "",
        "| # | block | env | first line | result | seconds |",
        "|---:|---|---|---|---|---:|",
    ]
    for n, (b, (ok, seconds)) in enumerate(zip(blocks, results), 1):
        env = "<br>".join(f"`{k}={v}`" for k, v in b.env.items()) if not args.as_written else ""
        first = b.code.strip().splitlines()[0]
        cells = [str(n), b.where, env, f"`{first}`", "ok" if ok else "FAILED", f"{seconds:.1f}"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    passed = sum(ok for ok, _ in results)
    lines += ["", f"{passed} passed, {len(results) - passed} failed."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_block(block: Block, number: int, repo: Path, scripts: Path, as_written: bool,
              timeout: float) -> tuple[bool, float]:
    suffix = ".sh" if block.kind == "bash" else ".py"
    script = scripts / f"{number:02d}-{block.file.replace('/', '_')}-{block.line}{suffix}"
    script.write_text(block.code, encoding="utf-8")
    env = block_env(block, repo, as_written)
    if block.kind == "bash":
        cmd = ["bash", "-eo", "pipefail", str(script)]
    else:
        cmd = [shutil.which("python", path=env["PATH"]) or sys.executable, str(script)]
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in block.env.items()) if block.env and not as_written else ""
    print(f"docs-check: [{number}] {block.where} ({block.kind}{', ' + shown if shown else ''}) ...", flush=True)
    t0 = time.perf_counter()
    # its own session, so that a timeout ends everything the block started (pip, pytest, ...), not just bash
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code, output = proc.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code, output = None, out.decode(errors="replace") + f"\n(timed out after {timeout:.0f} s)"
    seconds = time.perf_counter() - t0
    if code == 0:
        print(f"docs-check: [{number}] {block.where} ok ({seconds:.0f} s)", flush=True)
        return True, seconds
    tail = "\n".join(output.rstrip().splitlines()[-40:])
    print(f"docs-check: [{number}] {block.where} FAILED (exit {code}, {seconds:.0f} s); last lines:\n{tail}",
          flush=True)
    return False, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bash scripts/docs_check.sh",
                                description="Run the snippets of README.md and docs/*.md marked <!-- docs-check -->.")
    p.add_argument("files", nargs="*", help="Markdown files (default: README.md and docs/*.md)")
    p.add_argument("--list", action="store_true", help="list the marked blocks and exit")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy the blocks ran in")
    p.add_argument("--as-written", action="store_true", default=os.environ.get("DOCS_CHECK_AS_WRITTEN") == "1",
                   help="ignore the markers' env: settings (run every block exactly as the doc shows it)")
    p.add_argument("--no-install", action="store_true",
                   help="with FILES: do not run README.md's first block (the install) first; blocks then run in "
                        "the environment this script was started from")
    p.add_argument("--log", default=None, metavar="MD",
                   help="also write a Markdown record (machine, threads, load, seconds per block) to this file")
    args = p.parse_args(argv)

    readme = ROOT / "README.md"
    files = [Path(f).resolve() for f in args.files] or [readme, *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [b for f in files for b in find_blocks(f)]
    if args.files and not args.no_install and readme not in files:
        install = find_blocks(readme)[:1]  # the environment the other blocks need
        blocks = install + blocks
    if not blocks:
        print("docs-check: no block is marked <!-- docs-check --> in " + ", ".join(str(f) for f in files))
        return 2
    if args.list:
        for n, b in enumerate(blocks, 1):
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in b.env.items())
            print(f"[{n}] {b.where} {b.kind}{' env: ' + env if env else ''}: {b.code.strip().splitlines()[0][:80]}")
        return 0

    timeout = float(os.environ.get("DOCS_CHECK_TIMEOUT", "3600"))
    work = Path(tempfile.mkdtemp(prefix="duodiff-docs-check-"))
    repo, scripts = work / "duodiff", work / "blocks"
    scripts.mkdir()
    t0 = time.perf_counter()
    started, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average()
    try:
        copy_tree(repo)
        print(f"docs-check: {len(blocks)} block(s) from {len({b.file for b in blocks})} file(s), run in {repo}",
              flush=True)
        results = [run_block(b, n, repo, scripts, args.as_written, timeout) for n, b in enumerate(blocks, 1)]
        failed = [b.where for b, (ok, _) in zip(blocks, results) if not ok]
        if args.log:
            write_log(Path(args.log), blocks, results, args, started, load_start)
    finally:
        if args.keep:
            print(f"docs-check: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.perf_counter() - t0) / 60
    print(f"docs-check: {len(blocks) - len(failed)} passed, {len(failed)} failed in {minutes:.1f} min"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
