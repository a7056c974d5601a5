"""Training: `duodiff train` end to end on phantoms, loss decrease, exact resume, DDP (gloo)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from duodiff import DuoDiffusion
from duodiff.io import spacing_affine, write_nifti
from duodiff.testing import phantom_pair
from duodiff.train import STAGES, TrainConfig, load_train_config, train
from duodiff.train.config import STAGE_DEFAULTS

SHAPE = (16, 16, 16)


def write_dataset(root: Path, n: int = 4, *, nnunet: bool = False, shape=(18, 20, 17),
                  spacing=(1.0, 1.0, 1.0)) -> Path:
    """An MSD (or nnU-Net) folder of phantom pairs, slightly larger than SHAPE so cropping is exercised."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    aff = spacing_affine(spacing)
    for i in range(n):
        img, lab = phantom_pair(shape, num_classes=3, seed=i)
        name = f"case_{i:03d}"
        img_name = f"{name}_0000.nii.gz" if nnunet else f"{name}.nii.gz"
        write_nifti(root / "imagesTr" / img_name, img * (i + 1), aff)  # different intensity scale per case
        write_nifti(root / "labelsTr" / f"{name}.nii.gz", lab, aff)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "outer", "2": "inner"}}))
    return root


def make_config(tmp: Path, data: Path, *, steps: int = 4, **stage_overrides) -> TrainConfig:
    stage = dict(steps=steps, batch_size=2, lr=1e-3, warmup_steps=0, log_every=1, checkpoint_every=2)
    stage.update(stage_overrides)
    return TrainConfig.from_dict({
        "data": {"root": str(data)},
        "model": {"preset": "tiny", "volume_shape": list(SHAPE)},
        "stages": {s: dict(stage) for s in STAGES},
        "output_dir": str(tmp / "run"),
        "seed": 0,
        "progress": False,
    })


def read_losses(run: Path, stage: str) -> list[float]:
    with open(run / "logs" / f"{stage}.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("target", [(), (2.0, 2.0, 2.5)])
def test_trained_model_records_the_training_spacing(tmp_path, target):
    """The model's ``spacing`` (NIfTI affines of samples, mL of class volumes) is the data's, not the preset's."""
    from duodiff.train.trainer import Trainer

    root = write_dataset(tmp_path / "d", n=2, spacing=(1.5, 0.8, 2.0))
    cfg = make_config(tmp_path, root)
    cfg = cfg.replace(data=cfg.data.replace(target_spacing=target))
    trainer = Trainer(cfg)
    assert trainer.data.report["cases"]["case_000"]["spacing"] == pytest.approx(target or (1.5, 0.8, 2.0))
    assert trainer.load_pipeline().config.spacing == pytest.approx(target or (1.5, 0.8, 2.0))


def test_train_all_stages_writes_loadable_pipeline(dataset, tmp_path):
    cfg = make_config(tmp_path, dataset, steps=3)
    model_dir = train(cfg)
    state = json.loads((tmp_path / "run" / "logs" / "stages.json").read_text())
    assert all(state[s]["finished"] for s in STAGES)
    for s in STAGES:
        assert all(np.isfinite(read_losses(tmp_path / "run", s)))
    pipe = DuoDiffusion.from_pretrained(model_dir)
    assert pipe.config.label_names == ("background", "outer", "inner")
    assert pipe.config.label_scale_factor != 1.0 and pipe.config.image_scale_factor != 1.0
    out = pipe.sample(2, seed=0, num_inference_steps=2, progress=False)
    assert out.images.shape == (2, 1, *SHAPE)


def test_losses_decrease_over_a_short_run(dataset, tmp_path):
    cfg = make_config(tmp_path, dataset, steps=30, lr=3e-3, checkpoint_every=0)
    train(cfg, stages=["label_autoencoder"])
    losses = read_losses(tmp_path / "run", "label_autoencoder")
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_kill_and_resume_gives_identical_losses(dataset, tmp_path):
    full = make_config(tmp_path / "a", dataset, steps=6)
    train(full, stages=["label_autoencoder", "label_unet"])
    # interrupted after the checkpoint at step 4, then resumed (twice: once mid-way through label_unet)
    part2 = make_config(tmp_path / "c", dataset, steps=6)
    train(part2, stages=["label_autoencoder"], stop_after=4)
    train(part2, stages=["label_autoencoder", "label_unet"], resume=True, stop_after=3)
    train(part2, stages=["label_autoencoder", "label_unet"], resume=True)
    for stage in ("label_autoencoder", "label_unet"):
        assert read_losses(tmp_path / "a" / "run", stage) == read_losses(tmp_path / "c" / "run", stage)
    a = DuoDiffusion.from_pretrained(tmp_path / "a" / "run" / "model")
    c = DuoDiffusion.from_pretrained(tmp_path / "c" / "run" / "model")
    for name in ("label_autoencoder", "label_unet"):
        for (k, v), (_, w) in zip(getattr(a, name).state_dict().items(), getattr(c, name).state_dict().items()):
            assert torch.equal(v, w), k


def _weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in getattr(DuoDiffusion.from_pretrained(run / "model"), name).state_dict().items()}


def test_rerunning_a_stage_starts_from_its_initial_weights_and_finetune_continues(dataset, tmp_path):
    """A re-run never silently continues from trained weights; --finetune does, with its own log and checkpoints."""
    cfg = make_config(tmp_path, dataset, steps=4)
    run = tmp_path / "run"
    train(cfg, stages=["label_autoencoder", "image_autoencoder", "image_unet", "image_controlnet"])
    first = {n: _weights(run, n) for n in ("label_autoencoder", "image_controlnet")}
    # the same stages again: the same result (they start from their initialisation, not from `first`)
    train(cfg, stages=["label_autoencoder", "image_controlnet"])
    for n in first:
        again = _weights(run, n)
        assert all(torch.equal(first[n][k], again[k]) for k in again), n
    # --finetune: four more steps from the trained weights
    train(cfg, stages=["label_autoencoder", "image_controlnet"], finetune=True)
    state = json.loads((run / "logs" / "stages.json").read_text())
    for n in first:
        tuned = _weights(run, n)
        assert not all(torch.equal(first[n][k], tuned[k]) for k in tuned), n
        assert state[n]["finetuned_from"]["steps"] == 4 and state[n]["total_steps"] == 8
        assert state[n]["total_seconds"] >= state[n]["seconds"]
        assert len(read_losses(run, f"{n}+ft4")) == 4 and len(read_losses(run, n)) == 4  # first log kept
        assert (run / "checkpoints" / f"{n}+ft4").is_dir()
    # fine-tuned ControlNet = the trained one + 4 steps: its first loss continues from the trained level,
    # not from a fresh copy of the image UNet
    assert read_losses(run, "image_controlnet+ft4")[0] != read_losses(run, "image_controlnet")[0]
    # a second fine-tune counts on from the first
    train(cfg, stages=["label_autoencoder"], finetune=True, stop_after=2)
    state = json.loads((run / "logs" / "stages.json").read_text())["label_autoencoder"]
    assert state["finetuned_from"]["steps"] == 8 and not state["finished"]
    train(cfg, stages=["label_autoencoder"], finetune=True, resume=True)
    state = json.loads((run / "logs" / "stages.json").read_text())["label_autoencoder"]
    assert state["finished"] and state["total_steps"] == 12 and len(read_losses(run, "label_autoencoder+ft8")) == 4


def test_finetune_needs_a_finished_stage(dataset, tmp_path):
    cfg = make_config(tmp_path, dataset, steps=4)
    with pytest.raises(ValueError, match="--finetune continues a finished stage.*label_autoencoder"):
        train(cfg, stages=["label_autoencoder"], finetune=True)


def test_stage_dependency_is_checked(dataset, tmp_path):
    cfg = make_config(tmp_path, dataset)
    with pytest.raises(ValueError, match="needs a trained 'label_autoencoder'"):
        train(cfg, stages=["label_unet"])
    with pytest.raises(ValueError, match="Unknown stage"):
        train(cfg, stages=["vae"])


def test_toml_config_unknown_key_and_relative_paths(tmp_path, dataset):
    good = tmp_path / "train.toml"
    good.write_text(textwrap.dedent(f"""
        output_dir = "out"
        [data]
        root = "{dataset}"
        [model]
        preset = "tiny"
        [stages.label_unet]
        steps = 7
    """))
    cfg = load_train_config(good)
    assert cfg.output_dir == str(tmp_path / "out") and cfg.stages["label_unet"].steps == 7
    # a table replaces only the keys it sets; the rest are that stage's defaults (the fidelity recipe's schedule)
    assert cfg.stages["label_unet"].batch_size == STAGE_DEFAULTS["label_unet"]["batch_size"] == 16
    assert cfg.stages["label_unet"].lr == STAGE_DEFAULTS["label_unet"]["lr"]
    assert cfg.stages["image_autoencoder"].steps == STAGE_DEFAULTS["image_autoencoder"]["steps"] == 6000
    assert cfg.stages["image_autoencoder"].lr == 5e-4 and cfg.stages["label_autoencoder"].lr == 5e-4
    assert cfg.stages["image_autoencoder"].scale_equivariance_weight == 0.5  # the recipe's (issue 12)
    assert cfg.stages["image_controlnet"].steps == 6000 and cfg.stages["image_controlnet"].batch_size == 8
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("steps = 7", "stepz = 7"))
    with pytest.raises(ValueError, match="Unknown key.*stepz"):
        load_train_config(bad)


def test_cli_train_subprocess(dataset, tmp_path):
    cfg = tmp_path / "t.toml"
    stages = "\n".join(f"[stages.{s}]\nsteps = 2\nbatch_size = 2\nlog_every = 1\n" for s in STAGES)
    cfg.write_text(f'output_dir = "run"\nprogress = false\n[data]\nroot = "{dataset}"\n[model]\npreset = "tiny"\n'
                   f"volume_shape = [16, 16, 16]\n{stages}")
    r = subprocess.run([sys.executable, "-m", "duodiff.cli.main", "train", str(cfg), "--stage", "label_autoencoder"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()
    r = subprocess.run([sys.executable, "-m", "duodiff.cli.main", "train", str(tmp_path / "missing.toml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "No training config" in r.stderr and "Traceback" not in r.stderr


DDP_SCRIPT = """
import hashlib, json, sys, torch, torch.distributed as dist
from pathlib import Path
from duodiff.train import TrainConfig, Trainer
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
out = Path(sys.argv[2])  # each rank reports in its own file: two ranks printing to one pipe can interleave
with Trainer(cfg) as trainer:  # the trainer created the process group, so leaving the block destroys it
    trainer.run(["label_autoencoder"])
    rank = dist.get_rank()
    # every rank hashes its own replica of the trained weights: DDP must have kept them identical
    state = trainer.trained["label_autoencoder"].state_dict()
    h = hashlib.sha256(b"".join(v.detach().float().numpy().tobytes() for v in state.values())).hexdigest()
    hs = [None] * dist.get_world_size()
    dist.all_gather_object(hs, h)
(out / f"rank{rank}.json").write_text(json.dumps({"hashes": hs, "initialized_after": dist.is_initialized()}))
"""


def test_ddp_gloo_two_processes_keep_replicas_in_sync(dataset, tmp_path):
    cfg = make_config(tmp_path, dataset, steps=3).to_dict()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # -X faulthandler: should a rank ever abort, its Python stacks are in the failure message
    reports = tmp_path / "reports"
    reports.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
         "--no-python", sys.executable, "-X", "faulthandler", "-c", DDP_SCRIPT, json.dumps(cfg), str(reports)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    said = f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-6000:]}"
    assert r.returncode == 0, said
    ranks = [json.loads((reports / f"rank{k}.json").read_text()) for k in range(2)]
    assert ranks[0]["hashes"] == ranks[1]["hashes"], said  # both ranks gathered the same two hashes ...
    assert len(set(ranks[0]["hashes"])) == 1, said  # ... and the two replicas are identical
    # both ranks left the trainer with their process group destroyed
    assert [k["initialized_after"] for k in ranks] == [False, False], said
    assert DuoDiffusion.from_pretrained(tmp_path / "run" / "model").config.label_scale_factor != 1.0


def test_nonfinite_gradients_skip_the_update(tmp_path):
    from duodiff.train.config import StageConfig
    from duodiff.train.loop import run_stage

    model = torch.nn.Linear(2, 1)
    poison = {"on": False}
    model.weight.register_hook(lambda g: torch.full_like(g, float("inf")) if poison["on"] else g)

    def loss_fn(m, ctx):
        poison["on"] = ctx.step == 2  # step 3 (1-based) gets an infinite gradient
        return (m(torch.ones(4, 2)) - 1).pow(2).mean(), {}

    cfg = StageConfig(steps=4, batch_size=1, warmup_steps=0, log_every=1, checkpoint_every=0)
    trained, finished = run_stage("toy", model, loss_fn, cfg, num_samples=4, seed=0, device=torch.device("cpu"),
                                  amp="float32", ckpt_root=tmp_path / "ck", log_file=tmp_path / "toy.csv",
                                  use_ema=False, progress=False)
    assert finished and all(torch.isfinite(p).all() for p in trained.parameters())
    with open(tmp_path / "toy.csv") as f:
        skipped = [int(r["skipped_steps"]) for r in csv.DictReader(f)]
    assert skipped == [0, 0, 1, 1]


@pytest.mark.slow
def test_sigkill_train_then_resume_gives_identical_weights(dataset, tmp_path):
    """A real `duodiff train` subprocess killed with SIGKILL mid-stage, then `--resume`, ends bit-identical."""
    import signal
    import time

    from safetensors.torch import load_file

    def write_cfg(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        body = (f'output_dir = "run"\nprogress = false\n[data]\nroot = "{dataset}"\n[model]\npreset = "tiny"\n'
                "volume_shape = [16, 16, 16]\n[stages.label_autoencoder]\nsteps = 40\nbatch_size = 2\n"
                "checkpoint_every = 5\nlog_every = 1\nwarmup_steps = 0\n")
        (folder / "t.toml").write_text(body)
        return folder / "t.toml"

    cmd = [sys.executable, "-m", "duodiff.cli.main", "train"]
    ref = write_cfg(tmp_path / "ref")
    subprocess.run(cmd + [str(ref), "--stage", "label_autoencoder"], check=True, timeout=600, capture_output=True)
    killed = write_cfg(tmp_path / "killed")
    proc = subprocess.Popen(cmd + [str(killed), "--stage", "label_autoencoder"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "run" / "checkpoints" / "label_autoencoder"
    deadline = time.time() + 600
    while time.time() < deadline and not any(p.name.startswith("step-") for p in ckpts.glob("step-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "killed" / "run" / "model" / "model_index.json").exists()  # really killed mid-stage
    r = subprocess.run(cmd + [str(killed), "--stage", "label_autoencoder", "--resume"], timeout=600,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = load_file(str(tmp_path / "ref" / "run" / "model" / "label_autoencoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "run" / "model" / "label_autoencoder" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_losses(tmp_path / "ref" / "run", "label_autoencoder") == read_losses(
        tmp_path / "killed" / "run", "label_autoencoder")


def test_model_tables_override_the_preset_and_ssim_loss_trains(tmp_path, dataset):
    """[model.image_autoencoder] gives a 2x image latent; ssim_weight adds MONAI's SSIMLoss to the image stage."""
    toml = tmp_path / "train.toml"
    toml.write_text(textwrap.dedent(f"""
        output_dir = "out"
        progress = false
        [data]
        root = "{dataset}"
        [model]
        preset = "tiny"
        volume_shape = [16, 16, 16]
        [model.image_autoencoder]
        channels = [8]
        num_res_blocks = [1]
        attention_levels = [false]
        latent_channels = 4
        [stages.image_autoencoder]
        steps = 3
        batch_size = 2
        warmup_steps = 0
        log_every = 1
        ssim_weight = 0.5
    """))
    cfg = load_train_config(toml)
    assert cfg.model.overrides == {"image_autoencoder": {"channels": [8], "num_res_blocks": [1],
                                                         "attention_levels": [False], "latent_channels": 4}}
    model_dir = train(cfg, stages=["image_autoencoder"])
    pipe = DuoDiffusion.from_pretrained(model_dir)
    assert pipe.config.image_latent_shape == (4, 16, 16, 16)
    assert pipe.config.image_unet.in_channels == 4
    with open(tmp_path / "out" / "logs" / "image_autoencoder.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(0 < float(r["ssim_loss"]) <= 2 for r in rows)
    toml.write_text(toml.read_text().replace("latent_channels = 4", "latent_chanels = 4"))
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['latent_chanels'\] in \[model.image_autoencoder\]"):
        load_train_config(toml)


def test_autoencoder_patch_training_and_its_checks(tmp_path, dataset):
    cfg = make_config(tmp_path, dataset, steps=2)
    stages = {s: v.to_dict() for s, v in cfg.stages.items()}
    stages["image_autoencoder"]["patch_size"] = [8, 8, 8]
    stages["label_autoencoder"]["patch_size"] = [8, 8, 8]
    good = TrainConfig.from_dict({**cfg.to_dict(), "stages": stages})
    model_dir = train(good, stages=["label_autoencoder", "image_autoencoder"])
    assert DuoDiffusion.from_pretrained(model_dir).config.volume_shape == SHAPE  # whole volumes afterwards
    assert len(read_losses(tmp_path / "run", "image_autoencoder")) == 2
    stages["image_autoencoder"]["patch_size"] = [7, 8, 8]  # tiny preset: 2x downsampling
    bad = TrainConfig.from_dict({**cfg.to_dict(), "stages": stages, "output_dir": str(tmp_path / "bad")})
    with pytest.raises(ValueError, match=r"patch_size \[7, 8, 8\] must fit .* divisible by twice the autoencoder's "
                                         r"downsampling \(4; scale_equivariance_weight > 0\)"):
        train(bad, stages=["image_autoencoder"])  # the default scale-equivariance term pools the patch 2x
    stages["image_autoencoder"]["scale_equivariance_weight"] = 0.0
    bad = TrainConfig.from_dict({**cfg.to_dict(), "stages": stages, "output_dir": str(tmp_path / "bad0")})
    with pytest.raises(ValueError, match=r"patch_size \[7, 8, 8\] must fit .* divisible by the autoencoder's "
                                         r"downsampling \(2\)"):
        train(bad, stages=["image_autoencoder"])
    with pytest.raises(ValueError, match="patch_size must be 3 positive sides"):
        TrainConfig.from_dict({**cfg.to_dict(), "stages": {"image_autoencoder": {"patch_size": [8, 8]}}})


def test_init_from_keeps_the_label_side_and_trains_the_image_side(tmp_path, dataset):
    """Retrain the image side with new settings, keeping a trained model's label autoencoder and label UNet."""
    first = make_config(tmp_path / "first", dataset, steps=2)
    base_dir = train(first, stages=["label_autoencoder", "label_unet"])
    base = DuoDiffusion.from_pretrained(base_dir)
    cfg = TrainConfig.from_dict({**make_config(tmp_path, dataset, steps=2).to_dict(), "model": {
        "preset": "tiny", "volume_shape": list(SHAPE), "init_from": str(base_dir),
        "init_components": ["label_autoencoder", "label_unet"],
        "image_autoencoder": {"latent_channels": 4},
    }})
    model_dir = train(cfg, stages=["image_autoencoder", "image_unet"])  # no label stage runs
    pipe = DuoDiffusion.from_pretrained(model_dir)
    for name in ("label_autoencoder", "label_unet"):
        for k, v in getattr(base, name).state_dict().items():
            assert torch.equal(getattr(pipe, name).state_dict()[k], v), (name, k)
    assert pipe.config.label_scale_factor == base.config.label_scale_factor
    assert pipe.config.image_latent_shape[0] == 4
    stages = json.loads((tmp_path / "run" / "logs" / "stages.json").read_text())
    assert stages["label_unet"]["init_from"] == str(base_dir) and stages["image_unet"]["finished"]
    with pytest.raises(ValueError, match="init_components one of"):
        TrainConfig.from_dict({**cfg.to_dict(), "model": {"init_from": str(base_dir),
                                                          "init_components": ["label_unet"]}})
    other = TrainConfig.from_dict({**cfg.to_dict(), "output_dir": str(tmp_path / "other"), "model": {
        **cfg.model.to_dict(), "volume_shape": [16, 16, 8]}})
    with pytest.raises(ValueError, match=r"trained on other data: volume_shape \(16, 16, 16\) there"):
        train(other, stages=["image_autoencoder"])


def test_init_from_folder_is_relative_to_the_config(tmp_path, dataset):
    (tmp_path / "models" / "base").mkdir(parents=True)
    toml = tmp_path / "cfg" / "train.toml"
    toml.parent.mkdir()
    toml.write_text(textwrap.dedent(f"""
        [data]
        root = "{dataset}"
        [model]
        preset = "tiny"
        init_from = "../models/base"
        init_components = ["label_autoencoder"]
    """))
    assert load_train_config(toml).model.init_from == str(tmp_path / "models" / "base")
    toml.write_text(toml.read_text().replace("../models/base", "org/name"))  # not a folder: a Hub id
    assert load_train_config(toml).model.init_from == "org/name"


def test_trained_model_records_its_training_cases(tmp_path):
    """Provenance: the model folder lists the case ids it was trained on (and validated on), the card says so,
    and the test cases of the split appear nowhere."""
    data = write_dataset(tmp_path / "d", n=4)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["case_002", "case_000"], "val": ["case_001"], "test": ["case_003"]}))
    cfg = make_config(tmp_path, data, steps=1).to_dict()
    cfg["data"]["split"] = str(split)
    model_dir = train(TrainConfig.from_dict(cfg), stages=["label_autoencoder"])
    prov = json.loads((model_dir / "training_cases.json").read_text())
    assert sorted(prov["train"]) == ["case_000", "case_002"] and prov["val"] == ["case_001"]
    assert prov["data"] == "d" and prov["split"] == "split.json" and "init_from" not in prov
    card = (model_dir / "README.md").read_text()
    assert "2 cases of `d`" in card and "training_cases.json" in card
    assert "case_003" not in card and "case_003" not in json.dumps(prov)
    DuoDiffusion.from_pretrained(model_dir)  # the extra file does not disturb loading


def test_scale_equivariance_term_decodes_the_pooled_latent_to_the_pooled_image():
    """scale_equivariance_weight adds L1(decode(avgpool(z)), avgpool(x)) (Skorokhodov et al. 2025) to the image
    autoencoder loss, and its gradient reaches the encoder through the pooled latent."""
    import torch.nn.functional as F
    from monai.networks.nets import AutoencoderKL

    from duodiff.train.loop import StepContext
    from duodiff.train.stages import AutoencoderStep, autoencoder_loss, random_patches

    torch.manual_seed(0)
    ae = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8), num_res_blocks=(1, 1),
                       attention_levels=(False, False), latent_channels=2, norm_num_groups=4)
    images = torch.rand(3, 1, 16, 16, 16)
    step = AutoencoderStep(ae)
    idx = torch.tensor([0, 2])
    kw = dict(kind="image", num_classes=2, latent_shape=(2, 8, 8, 8), kl_weight=0.0, dice_weight=0.0,
              patch_size=(8, 8, 8), downsample_factor=2)

    def ctx() -> StepContext:
        return StepContext(step=0, indices=idx, generator=torch.Generator().manual_seed(1), device=torch.device("cpu"))

    plain, logs0 = autoencoder_loss(images, None, **kw)(step, ctx())
    with_se, logs = autoencoder_loss(images, None, scale_equivariance_weight=0.5, **kw)(step, ctx())
    assert "scale_equivariance_l1" not in logs0 and logs["l1"] == pytest.approx(logs0["l1"])
    assert with_se.item() == pytest.approx(plain.item() + 0.5 * logs["scale_equivariance_l1"], rel=1e-5)
    # the term by hand, from the same noise and crop: decode the 2x-pooled sampled latent, compare with the pooled crop
    g = torch.Generator().manual_seed(1)
    eps = torch.randn((2, 2, 4, 4, 4), generator=g)
    (x,) = random_patches((images[idx],), (8, 8, 8), g)
    with torch.no_grad():
        mu, sigma = ae.encode(x)
        expected = (ae.decode(F.avg_pool3d(mu + sigma * eps, 2)) - F.avg_pool3d(x, 2)).abs().mean()
    assert logs["scale_equivariance_l1"] == pytest.approx(expected.item(), rel=1e-5)
    with_se.backward()
    assert next(ae.encoder.parameters()).grad.abs().sum() > 0


def test_scale_equivariance_needs_patches_divisible_by_twice_the_downsampling(tmp_path, dataset):
    toml = tmp_path / "train.toml"
    toml.write_text(textwrap.dedent(f"""
        output_dir = "out"
        progress = false
        [data]
        root = "{dataset}"
        [model]
        preset = "tiny"
        volume_shape = [16, 16, 16]
        [stages.image_autoencoder]
        steps = 1
        patch_size = [6, 6, 6]
        scale_equivariance_weight = 0.5
    """))
    msg = r"patch_size \[6, 6, 6\].*divisible by twice the autoencoder's downsampling \(4"
    with pytest.raises(ValueError, match=msg):
        train(load_train_config(toml), stages=["image_autoencoder"])


def _image_autoencoder_toml(output_dir: str, dataset, *, steps: int) -> str:
    """A tiny-preset config whose last table is ``[stages.image_autoencoder]`` (append keys to it)."""
    return textwrap.dedent(f"""
        output_dir = "{output_dir}"
        progress = false
        [data]
        root = "{dataset}"
        [model]
        preset = "tiny"
        volume_shape = [16, 16, 16]
        [stages.image_autoencoder]
        steps = {steps}
        batch_size = 2
        warmup_steps = 0
        lr = 1e-2
    """)


def test_decoder_only_finetune_keeps_the_latent(tmp_path, dataset):
    """decoder_only = true with --finetune trains the decoder (here with latent noise augmentation) and leaves the
    encoder (the latent the UNets learned, and its scale factor) exactly as it was; without --finetune it is
    refused."""
    from safetensors.torch import load_file

    toml = tmp_path / "train.toml"
    toml.write_text(_image_autoencoder_toml("out", dataset, steps=2))
    train(load_train_config(toml), stages=["image_autoencoder"])
    weights = tmp_path / "out" / "model" / "image_autoencoder" / "model.safetensors"
    before = load_file(str(weights))
    # the scale factor the UNets learned is kept as saved, not recomputed (a stage run under bf16 autocast
    # recomputes to other last digits): mark it with a value no recomputation gives
    index = tmp_path / "out" / "model" / "model_index.json"
    meta = json.loads(index.read_text())
    meta["pipeline"]["image_scale_factor"] = scale = 0.123
    index.write_text(json.dumps(meta))
    toml.write_text(toml.read_text() + "decoder_only = true\nlatent_noise_std = 0.1\n")
    with pytest.raises(ValueError, match=r"decoder_only fine-tunes the decoder.*--finetune"):
        train(load_train_config(toml), stages=["image_autoencoder"])
    train(load_train_config(toml), stages=["image_autoencoder"], finetune=True)
    after = load_file(str(weights))
    enc = [k for k in before if k.startswith(("encoder.", "quant_conv_"))]
    dec = [k for k in before if k.startswith(("decoder.", "post_quant_conv"))]
    assert enc and dec and set(enc) | set(dec) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)
    assert DuoDiffusion.from_pretrained(tmp_path / "out" / "model").config.image_scale_factor == scale


def test_decoder_noise_phase_trains_only_the_decoder_after_the_stage_and_resumes_exactly(tmp_path, dataset):
    """decoder_noise_fraction > 0: after the stage's steps, round(fraction * steps) decoder-only steps with latent
    noise, in their own checkpoints and log; the encoder equals that of the same run without the phase, the
    decoder differs; a run stopped inside the phase and resumed ends bit-identical; no latent noise is an error."""
    from safetensors.torch import load_file

    def run(name: str, extra: str, **kw) -> dict:
        toml = tmp_path / f"{name}.toml"
        toml.write_text(_image_autoencoder_toml(name, dataset, steps=4)
                        + "decoder_noise_lr = 1e-2\nscale_equivariance_weight = 0.0\n" + extra)
        cfg = load_train_config(toml)
        train(cfg, stages=["image_autoencoder"], **kw)
        return load_file(str(tmp_path / name / "model" / "image_autoencoder" / "model.safetensors"))

    plain = run("plain", "decoder_noise_fraction = 0.0\n")
    phase = run("phase", "decoder_noise_fraction = 0.5\nlatent_noise_std = 0.5\n")
    out = tmp_path / "phase"
    assert (out / "checkpoints" / "image_autoencoder+decoder").is_dir()
    assert (out / "logs" / "image_autoencoder+decoder.csv").read_text().splitlines()[-1].startswith("2,")  # 2 steps
    assert json.loads((out / "logs" / "stages.json").read_text())["image_autoencoder"]["decoder_noise_steps"] == 2
    enc = [k for k in plain if k.startswith(("encoder.", "quant_conv_"))]
    dec = [k for k in plain if k.startswith(("decoder.", "post_quant_conv"))]
    assert all(torch.equal(plain[k], phase[k]) for k in enc)
    assert any(not torch.equal(plain[k], phase[k]) for k in dec)
    run("stopped", "decoder_noise_fraction = 0.5\nlatent_noise_std = 0.5\n", stop_after=5)
    stages = json.loads((tmp_path / "stopped" / "logs" / "stages.json").read_text())
    assert stages["image_autoencoder"]["finished"] is False
    resumed = run("stopped", "decoder_noise_fraction = 0.5\nlatent_noise_std = 0.5\n", resume=True)
    assert all(torch.equal(phase[k], resumed[k]) for k in phase)
    with pytest.raises(ValueError, match=r"decoder_noise_fraction = 0.5 adds a decoder-noise phase.*latent_noise_std"):
        run("bad", "decoder_noise_fraction = 0.5\nlatent_noise_std = 0.0\n")


def test_image_prediction_type_trains_a_v_image_side_beside_an_epsilon_label_side(dataset, tmp_path, monkeypatch):
    """[model] image_prediction_type = "v_prediction": the image UNet and ControlNet learn v targets, the label UNet
    epsilon, and the saved model samples each side with its own schedule; an existing run folder trained with
    another image (or label) prediction type is refused instead of silently training on with the saved one."""
    import dataclasses

    import duodiff.train.stage_kinds as stage_kinds

    seen: list[str] = []
    real_loss = stage_kinds.diffusion_loss

    def spy(latents, scheduler_cfg, **kw):
        seen.append(scheduler_cfg.prediction_type)
        return real_loss(latents, scheduler_cfg, **kw)

    monkeypatch.setattr(stage_kinds, "diffusion_loss", spy)
    cfg = make_config(tmp_path, dataset, steps=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_prediction_type="v_prediction"))
    model_dir = train(cfg, stages=["label_autoencoder", "label_unet", "image_autoencoder", "image_unet",
                                   "image_controlnet"])
    assert seen == ["epsilon", "v_prediction", "v_prediction"]
    c = DuoDiffusion.from_pretrained(model_dir).config
    assert c.scheduler.prediction_type == "epsilon" and c.image_scheduler.prediction_type == "v_prediction"
    again = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_prediction_type=""))
    with pytest.raises(ValueError, match=r"image side trained with prediction_type 'v_prediction'.*new output_dir"):
        train(again, stages=["image_unet"])
    label_v = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match=r"label side trained with prediction_type 'epsilon'.*new output_dir"):
        train(label_v, stages=["label_unet"])
    with pytest.raises(ValueError, match=r"image_prediction_type must be one of \['epsilon', 'v_prediction', "
                                         r"'rectified_flow'\], got 'sample'"):
        dataclasses.replace(cfg.model, image_prediction_type="sample")


def test_rectified_flow_trains_and_samples_with_rflow(dataset, tmp_path):
    """[model] prediction_type = "rectified_flow" (both sides): every stage trains, the saved model records it,
    samples with rflow by default (the same pairs as scheduler="rflow"), and refuses a noise-schedule sampler."""
    import dataclasses

    cfg = make_config(tmp_path, dataset, steps=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, prediction_type="rectified_flow",
                                                             image_prediction_type="rectified_flow"))
    model_dir = train(cfg)
    for s in ("label_unet", "image_unet", "image_controlnet"):
        assert all(np.isfinite(read_losses(tmp_path / "run", s)))
    pipe = DuoDiffusion.from_pretrained(model_dir)
    assert pipe.config.schedule_of("label").prediction_type == "rectified_flow"
    assert pipe.config.schedule_of("image").prediction_type == "rectified_flow"
    out = pipe.sample(2, seed=0, num_inference_steps=3, dtype="float32", progress=False)
    assert out.images.shape == (2, 1, *SHAPE) and torch.isfinite(out.images).all()
    assert torch.equal(out.labels, pipe.sample(2, seed=0, num_inference_steps=3, dtype="float32", progress=False,
                                               scheduler="rflow").labels)
    with pytest.raises(ValueError, match=r"scheduler='ddim' cannot sample a model trained with "
                                         r"prediction_type='rectified_flow': use scheduler='rflow'"):
        pipe.sample(1, seed=0, num_inference_steps=3, scheduler="ddim", progress=False)


def test_rectified_flow_loss_regresses_the_straight_path_velocity():
    """The diffusion loss of a rectified-flow stage: its target is z0 - noise for the noisy input
    (1 - t/T) z0 + (t/T) noise, with t and noise from the step's seeded generator."""
    from duodiff.config import SchedulerConfig
    from duodiff.train.loop import StepContext
    from duodiff.train.stages import diffusion_loss

    z0 = torch.randn(3, 2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x, timesteps, context=None):
            seen["x"], seen["t"] = x, timesteps
            return torch.zeros_like(x)

    loss_fn = diffusion_loss(z0, SchedulerConfig(prediction_type="rectified_flow"))
    ctx = StepContext(step=0, indices=torch.arange(3), generator=torch.Generator().manual_seed(7),
                      device=torch.device("cpu"))
    loss, _ = loss_fn(Probe(), ctx)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    tau = (t.float() / 1000).view(-1, 1, 1, 1, 1)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x"], (1 - tau) * z0 + tau * noise)
    torch.testing.assert_close(loss, ((z0 - noise) ** 2).mean())


def test_each_stage_has_one_trainer_class_and_an_unknown_stage_is_refused():
    from duodiff.train.config import STAGES
    from duodiff.train.stage_kinds import AutoencoderStage, ControlNetStage, DiffusionStage, make_stage

    kinds = {s: make_stage(s) for s in STAGES}
    assert kinds == {"label_autoencoder": AutoencoderStage("label"), "image_autoencoder": AutoencoderStage("image"),
                     "label_unet": DiffusionStage("label"), "image_unet": DiffusionStage("image"),
                     "image_controlnet": ControlNetStage("image")}
    with pytest.raises(ValueError, match=r"Unknown stage 'image_vae'\. Stages are \['label_autoencoder'"):
        make_stage("image_vae")


def test_init_from_can_take_the_image_autoencoder_too(tmp_path, dataset):
    """init_components = [label_autoencoder, label_unet, image_autoencoder]: only the image UNet and ControlNet
    are trained (here with rectified flow), on the taken latent; another image autoencoder or another intensity
    normalisation is refused."""
    first = make_config(tmp_path / "first", dataset, steps=2)
    base_dir = train(first, stages=["label_autoencoder", "label_unet", "image_autoencoder"])
    base = DuoDiffusion.from_pretrained(base_dir)
    model = {"preset": "tiny", "volume_shape": list(SHAPE), "init_from": str(base_dir),
             "init_components": ["label_autoencoder", "label_unet", "image_autoencoder"],
             "image_prediction_type": "rectified_flow"}
    cfg = TrainConfig.from_dict({**make_config(tmp_path, dataset, steps=2).to_dict(), "model": model})
    model_dir = train(cfg, stages=["image_unet", "image_controlnet"])
    pipe = DuoDiffusion.from_pretrained(model_dir)
    for k, v in base.image_autoencoder.state_dict().items():
        assert torch.equal(pipe.image_autoencoder.state_dict()[k], v), k
    assert pipe.config.image_scale_factor == base.config.image_scale_factor
    assert pipe.config.schedule_of("image").prediction_type == "rectified_flow"
    stages = json.loads((tmp_path / "run" / "logs" / "stages.json").read_text())
    assert stages["image_autoencoder"]["init_from"] == str(base_dir) and stages["image_controlnet"]["finished"]
    assert pipe.sample(1, seed=0, num_inference_steps=2, dtype="float32", progress=False).images.shape[0] == 1
    other = TrainConfig.from_dict({**cfg.to_dict(), "output_dir": str(tmp_path / "o1"), "model": model,
                                   "data": {**cfg.data.to_dict(), "intensity_percentiles": [1.0, 99.0]}})
    with pytest.raises(ValueError, match=r"intensity percentiles \(0.5, 99.5\).*Use \[0.5, 99.5\]"):
        train(other, stages=["image_unet"])


def test_init_from_can_take_the_image_side(tmp_path, dataset):
    """init_components = the image side (autoencoder, UNet, ControlNet): only the label side is trained, here with
    another prediction type than the taken image side's; the image networks, scale factor and schedule stay, and an
    image side trained with another prediction type than [model] asks for is refused."""
    first = make_config(tmp_path / "first", dataset, steps=2)
    base_dir = train(first, stages=["image_autoencoder", "image_unet", "image_controlnet"])
    base = DuoDiffusion.from_pretrained(base_dir)
    image_side = ["image_autoencoder", "image_unet", "image_controlnet"]
    model = {"preset": "tiny", "volume_shape": list(SHAPE), "init_from": str(base_dir),
             "init_components": image_side, "prediction_type": "v_prediction",
             "image_prediction_type": base.config.schedule_of("image").prediction_type}
    cfg = TrainConfig.from_dict({**make_config(tmp_path, dataset, steps=2).to_dict(), "model": model})
    model_dir = train(cfg, stages=["label_autoencoder", "label_unet"])
    pipe = DuoDiffusion.from_pretrained(model_dir)
    for name in image_side:
        for k, v in getattr(base, name).state_dict().items():
            assert torch.equal(getattr(pipe, name).state_dict()[k], v), (name, k)
    assert pipe.config.image_scale_factor == base.config.image_scale_factor
    assert pipe.config.schedule_of("image") == base.config.schedule_of("image")
    assert pipe.config.schedule_of("label").prediction_type == "v_prediction"
    stages = json.loads((tmp_path / "run" / "logs" / "stages.json").read_text())
    assert all(stages[n]["init_from"] == str(base_dir) for n in image_side) and stages["label_unet"]["finished"]
    assert pipe.sample(1, seed=0, num_inference_steps=2, dtype="float32", progress=False).images.shape[0] == 1
    other = TrainConfig.from_dict({**cfg.to_dict(), "output_dir": str(tmp_path / "o1"),
                                   "model": {**model, "image_prediction_type": "rectified_flow"}})
    with pytest.raises(ValueError, match=r"image side trained with prediction_type '(epsilon|v_prediction)', but "
                                         r"\[model\] asks for 'rectified_flow'"):
        train(other, stages=["label_autoencoder"])
    with pytest.raises(ValueError, match="init_components one of"):
        TrainConfig.from_dict({**cfg.to_dict(), "model": {**model, "init_components": ["image_unet"]}})
