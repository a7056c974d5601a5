"""Every command takes `--threads N` and long commands say what they are doing (issue 17, point 1); `duodiff evaluate
--device cuda` on a CPU-only torch is one line, exit code 2 (point 5)."""

from __future__ import annotations

import pytest
import torch

from duodiff.cli.main import COMMANDS
from tests.cli.test_evaluate import _write_folder
from tests.cli.test_main import call_main
from tests.cli.test_train import write_config
from tests.conftest import error_lines, run_cli
from tests.test_export import make_msd
from tests.train.test_trainer import write_dataset

#: every command line that runs something (``export`` has one format so far)
COMMAND_LINES = [["sample"], ["info"], ["preview"], ["evaluate"], ["export", "nnunet"], ["convert"], ["train"],
                 ["bench"]]


def test_the_table_covers_every_command():
    assert {c[0] for c in COMMAND_LINES} == set(COMMANDS)


@pytest.mark.parametrize("command", COMMAND_LINES, ids=" ".join)
def test_every_command_documents_threads(command, capsys):
    code, out, _ = call_main([*command, "--help"], capsys)
    assert code == 0 and "--threads" in out


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
@pytest.mark.parametrize("command", COMMAND_LINES, ids=" ".join)
def test_threads_below_one_is_a_one_line_error(command, value, capsys):
    code, _, err = call_main([*command, "--threads", value], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"duodiff {' '.join(command)}: error:") and "--threads" in lines[0], lines[0]
    assert "positive integer" in lines[0] and value in lines[0], lines[0]


def test_threads_applies_to_the_command_and_is_restored(tiny_model_dir, monkeypatch, capsys):
    import duodiff.cli.info as info

    seen = []
    monkeypatch.setattr(info, "run", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    code, _, err = call_main(["info", str(tiny_model_dir), "--threads", str(before + 1)], capsys)
    assert code == 0, err
    assert seen == [before + 1] and torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    call_main(["info", str(tiny_model_dir)], capsys)
    assert seen[-1] == before  # no --threads, OMP_NUM_THREADS set: torch's own count


def test_without_threads_the_count_follows_the_load(tiny_model_dir, monkeypatch, capsys):
    """No --threads and no OMP_NUM_THREADS: as many threads as other processes leave cores free."""
    import duodiff.cli.info as info
    import duodiff.threads as threads

    seen = []
    monkeypatch.setattr(info, "run", lambda args: seen.append(torch.get_num_threads()) or 0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "threads_for_load", lambda: before + 1)
    code, _, err = call_main(["info", str(tiny_model_dir)], capsys)
    assert code == 0, err
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_sample_announces_its_phases_with_the_thread_count(tiny_model_dir, tmp_path):
    """The real console script, with OMP_NUM_THREADS=1 in its environment: `--threads 2` wins."""
    out = tmp_path / "synthetic"
    proc = run_cli(["sample", "-m", str(tiny_model_dir), "-n", "2", "--steps", "2", "--out", str(out),
                    "--threads", "2", "--preview", str(out / "p.png")], script=True)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert f"loading model from {str(tiny_model_dir)!r} ..." in err
    # the default dtype "auto" (pinned to float32 in the test suite) says what it resolved to
    assert f"generating 2 pair(s) (DDIM-2, float32 (auto), cpu, 2 threads, batch 4) into {out} ..." in err
    assert f"drawing the preview {out / 'p.png'} ..." in err
    assert err.index("loading model") < err.index("generating") < err.index("wrote 2 pair(s)")
    quiet = run_cli(["sample", "-m", str(tiny_model_dir), "-n", "1", "--steps", "2", "--out", str(tmp_path / "q"),
                     "--no-progress", "--threads", "1"])
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.strip().splitlines() == [f"wrote 1 pair(s) to {tmp_path / 'q'} (0 already there)"]


def test_an_error_after_an_announcement_is_still_one_line(tmp_path, capsys):
    code, _, err = call_main(["sample", "-m", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert err.strip().splitlines()[0] == f"loading model from {str(tmp_path / 'no-model')!r} ..."
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("duodiff sample: error: No model folder"), err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_evaluate_device_cuda_without_cuda_is_one_line(tmp_path):
    out = tmp_path / "report"
    proc = run_cli(["evaluate", "--real", str(tmp_path), "--out", str(out), "--device", "cuda"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("duodiff evaluate: error: --device 'cuda': no usable CUDA GPU"), lines[0]
    assert not out.exists()


def test_evaluate_announces_its_phases(tiny_model_dir, tmp_path, capsys, one_thread):
    real = _write_folder(tmp_path / "real", range(4), shape=(16, 16, 16))
    out = tmp_path / "report"
    code, _, err = call_main(["evaluate", "-m", str(tiny_model_dir), "--real", str(real), "-n", "2", "--steps", "2",
                              "--segmenter-steps", "2", "--detector-steps", "0", "--out", str(out), "--threads", "1"],
                             capsys)
    assert code == 0, err
    expected = [f"loading model from {str(tiny_model_dir)!r} ...", f"reading real pairs from {real} ...",
                "generating 2 pair(s) (DDIM-2, float32, cpu, 1 thread, batch 8) ...",
                "scoring 2 synthetic vs 4 real pairs: training the segmenter / feature network (2 steps), FID-2.5D, "
                "MS-SSIM, labels, memorisation (cpu, 1 thread) ..."]
    positions = [err.index(line) for line in expected]
    assert positions == sorted(positions), err


def test_export_announces_what_it_exports(tiny_model_dir, tmp_path, capsys):
    real = make_msd(tmp_path / "real", n=2)
    code, _, err = call_main(["export", "nnunet", "--real", str(real), "--synthetic", str(tiny_model_dir), "-n", "1",
                              "--steps", "2", "--dataset-id", "7", "--name", "X", "--out", str(tmp_path / "raw"),
                              "--threads", "1"], capsys)
    assert code == 0, err
    # the model is loaded later, by the export itself: the default sampler is named as each stage's own
    assert (f"exporting the real cases of {real} and 1 pair(s) generated by {str(tiny_model_dir)!r} (2 steps of "
            f"each stage's own sampler, float32, cpu, 1 thread) to {tmp_path / 'raw'}/Dataset007_X ...") in err
    code, _, err = call_main(["export", "nnunet", "--synthetic", str(tiny_model_dir), "-n", "1", "--steps", "2",
                              "--scheduler", "pndm", "--dataset-id", "8", "--name", "X", "--out",
                              str(tmp_path / "raw"), "--threads", "1"], capsys)
    assert code == 0, err
    assert f"1 pair(s) generated by {str(tiny_model_dir)!r} (PNDM-2, float32, cpu, 1 thread)" in err


def test_train_announces_the_run_and_each_stage(tmp_path, capsys):
    data = write_dataset(tmp_path / "data" / "Dataset", n=2)
    cfg = write_config(tmp_path, data)
    cfg.write_text(cfg.read_text().replace("progress = false", "progress = true"))
    code, _, err = call_main(["train", str(cfg), "--stage", "label_autoencoder", "--stop-after", "1",
                              "--threads", "1"], capsys)
    assert code == 0, err
    expected = [f"training label_autoencoder from {cfg} into {tmp_path / 'run'} (cpu, 1 thread) ...",
                "reading and preprocessing the training cases",
                "stage label_autoencoder: training 2 steps (batch 2, float32) ..."]
    positions = [err.index(line) for line in expected]
    assert positions == sorted(positions), err
    code, _, err = call_main(["train", str(cfg), "--stage", "label_autoencoder", "--resume", "--no-progress"], capsys)
    assert code == 0 and " ..." not in err, err  # --no-progress hides the announcements
