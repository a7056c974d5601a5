#!/usr/bin/env bash
# Runs every shell and Python snippet of README.md and docs/*.md that is marked runnable; fails if one fails.
#
#   bash scripts/docs_check.sh                 # every marked block (tens of minutes: it installs an environment)
#   bash scripts/docs_check.sh --list          # list the marked blocks, run nothing
#   bash scripts/docs_check.sh docs/index.md   # only the blocks of these files (README.md's first block still
#                                              # builds the environment unless --no-install)
#   pytest -m docs                             # the same, as the test tests/integration/test_docs_check.py (slow, deselected
#                                              # by the default `bash scripts/test.sh`)
#
# Marker convention: an HTML comment (invisible on GitHub) on the line right before a fenced ```bash / ```sh /
# ```python block:
#
#   <!-- docs-check -->                                  run the block as written
#   <!-- docs-check env: OMP_NUM_THREADS=1 X="a b" -->  run it with these variables set (bash syntax); use this
#                                                        for tiny settings where the doc's own numbers are too slow
#                                                        for a check, and say so in the doc. --as-written (or
#                                                        DOCS_CHECK_AS_WRITTEN=1) ignores every env: line.
#
# A marker that is not followed by a bash/sh/python block is an error, so a marked block is never skipped silently.
# How blocks run: the working tree (tracked files and untracked, not-ignored ones: what a fresh clone plus your
# edits holds) is copied into a temporary folder, and every block runs there, in order: README.md first, then
# docs/*.md by name, each file's blocks top to bottom, so a block can use files written by an earlier block of
# the same run (e.g. `my-model/` saved by a Python snippet, then loaded by `duodiff info my-model`). Bash blocks
# run with `bash -eo pipefail` (a failing line fails the block); Python blocks run as a script. Once a block has
# created `.venv` in the copy (the README's install block), every later block runs with that environment active,
# so the check never installs into, or tests, the environment it was started from. HF_HUB_OFFLINE=1 is set.
# Each block has a time limit (DOCS_CHECK_TIMEOUT seconds, default 3600). --keep keeps the temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/docs_check.py "$@"
