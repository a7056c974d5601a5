"""Thread count by load: torch's threads only where other processes leave cores free (duodiff.threads)."""

from __future__ import annotations

import sys

import pytest

import duodiff.threads as threads


@pytest.mark.parametrize(
    "cores, others, limit, expected",
    [
        (2, 0.0, 2, 2),    # idle 2-core machine: both cores
        (2, 0.2, 2, 2),    # background noise below IDLE_MARGIN is ignored
        (2, 0.3, 2, 1),    # part of a core taken: OpenMP threads would wait on a descheduled peer
        (2, 1.0, 2, 1),    # one busy loop
        (2, 1.7, 2, 1),    # a 2-thread training job: never below 1
        (2, 3.5, 2, 1),
        (16, 1.0, 16, 15),
        (16, 0.0, 4, 4),   # never above the limit
    ],
)
def test_threads_for_load(monkeypatch, cores, others, limit, expected):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_cores_of_others", lambda interval=0.2: others)
    assert threads.threads_for_load(max_threads=limit) == expected


def test_threads_for_load_without_a_load_reading_keeps_the_limit(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores_of_others", lambda interval=0.2: None)
    assert threads.threads_for_load(max_threads=3) == 3
    with pytest.raises(ValueError, match="positive int"):
        threads.threads_for_load(max_threads=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_busy_cores_of_others_reads_the_machine():
    busy = threads.busy_cores_of_others(0.05)
    assert busy is not None and 0.0 <= busy <= threads.available_cores() + 1.0
    assert 1 <= threads.threads_for_load(interval=0.05) <= threads.torch.get_num_threads()
