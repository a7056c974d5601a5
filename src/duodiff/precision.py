"""``dtype="auto"``: the fastest autocast dtype for a model on this machine, measured once and cached.

Which dtype is fastest depends on the processor, the op mix and the load: bfloat16 autocast was 1.8x faster than
float32 on a 2-core AMD EPYC but only 1.1x on a 2-core Xeon with AMX-BF16. So duodiff measures instead of
assuming. On first use of a model on a device, every candidate dtype (CPU: float32, bfloat16; CUDA: float16,
bfloat16, float32) runs both stages of the model's own networks on one sample: ``NUM_TRIAL_STEPS`` DDIM steps of
the label UNet and of the image UNet + ControlNet, and each decoder once. A dtype is a candidate only if its
decoded outputs match float32's on the same noise within :data:`TOLERANCE` (relative L2 distance of the label
logits and of the image); among those, the one with the lowest predicted time per pair for the requested number of
steps (``steps x step time + decode time``, both stages) wins. float32 always qualifies.

The measurements are cached in ``dtype_choices.json`` in :func:`cache_dir` (``$DUODIFF_CACHE``, else the user
cache folder), keyed by device, processor or GPU model, intra-op thread count, torch version and the model's
fingerprint (config and weights); later calls, in this and other processes, only read it. Delete the file to
measure again.

``DUODIFF_AUTO_DTYPE=float32`` (or another dtype) makes ``"auto"`` resolve to that dtype without measuring, e.g.
to make every process of a cluster job use the same dtype. Pass an explicit ``dtype`` for outputs that must be
identical across machines: the same seed gives slightly different volumes in different dtypes.

>>> from duodiff.precision import choose_dtype  # doctest: +SKIP
>>> choose_dtype(pipe, num_inference_steps=20)  # doctest: +SKIP
torch.bfloat16
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import re
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .dtypes import autocast, resolve_dtype
from .fingerprint import model_fingerprint
from .schedulers import DEFAULT_NUM_INFERENCE_STEPS
from .threads import busy_cores_of_others

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import DuoDiffusion

__all__ = [
    "AUTO",
    "CANDIDATES",
    "TOLERANCE",
    "NUM_TRIAL_STEPS",
    "CACHE_ENV",
    "AUTO_DTYPE_ENV",
    "CACHE_FILE",
    "DtypeTrial",
    "is_auto",
    "cache_dir",
    "cache_key",
    "measure_dtypes",
    "pick_dtype",
    "choose_dtype",
]

logger = logging.getLogger(__name__)

#: The ``dtype`` value that asks for the measured choice.
AUTO = "auto"
#: Candidate autocast dtypes per device type, in order of preference on a tie.
CANDIDATES: dict[str, tuple[str, ...]] = {"cpu": ("float32", "bfloat16"), "cuda": ("float16", "bfloat16", "float32")}
#: Largest accepted relative L2 distance ``||out - out_fp32|| / ||out_fp32||`` of a stage's decoded output (label
#: logits, image) from float32's after ``NUM_TRIAL_STEPS`` steps from the same noise.
TOLERANCE = 0.05
#: DDIM steps per stage in a trial (the whole trajectory from noise: the errors of every step add up).
NUM_TRIAL_STEPS = 3
#: Environment variable naming the cache folder (default: ``$XDG_CACHE_HOME/duodiff`` or ``~/.cache/duodiff``).
CACHE_ENV = "DUODIFF_CACHE"
#: Environment variable that makes ``"auto"`` resolve to a fixed dtype without measuring.
AUTO_DTYPE_ENV = "DUODIFF_AUTO_DTYPE"
#: File in :func:`cache_dir` holding the measurements.
CACHE_FILE = "dtype_choices.json"
_CACHE_VERSION = 1
_STAGES = ("label", "image")

_memo: dict[str, dict[str, dict[str, DtypeTrial]]] = {}
_fingerprints: weakref.WeakKeyDictionary[Any, tuple[tuple, str]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class DtypeTrial:
    """One dtype's measurement for one stage (batch 1).

    Attributes:
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        step_s: seconds per denoising step (label UNet, or image UNet + ControlNet).
        decode_s: seconds of one decode.
        error: relative L2 distance of the decoded output from float32's (``inf`` if it failed or was not finite).
        note: why the dtype failed, if it did (an exception, non-finite output).
    """

    dtype: str
    step_s: float
    decode_s: float
    error: float
    note: str = ""

    def seconds(self, num_inference_steps: int) -> float:
        """Predicted seconds of this stage for one sample: ``num_inference_steps`` steps and one decode."""
        return num_inference_steps * self.step_s + self.decode_s


def is_auto(dtype: Any) -> bool:
    """Whether ``dtype`` asks for the measured choice (``"auto"``, any case)."""
    return isinstance(dtype, str) and dtype.lower() == AUTO


def cache_dir() -> Path:
    """The folder of duodiff's small caches: ``$DUODIFF_CACHE``, else ``$XDG_CACHE_HOME/duodiff``, else
    ``~/.cache/duodiff`` (``%LOCALAPPDATA%\\duodiff`` on Windows)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "duodiff"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "duodiff"


def _processor_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if m:
            return m.group(1).strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _fingerprint(pipe: DuoDiffusion) -> str:
    """The model's fingerprint (config and weights), hashed again only after its weights changed."""
    # each tensor's storage and in-place version counter: cheap to read, and they change when the weights do
    state = tuple((t.data_ptr(), t._version) for m in pipe.modules()
                  for t in m.state_dict(keep_vars=True).values())
    known = _fingerprints.get(pipe)
    if known is None or known[0] != state:
        known = (state, model_fingerprint(pipe, {}))
        _fingerprints[pipe] = known
    return known[1]


def cache_key(pipe: DuoDiffusion) -> str:
    """``"<device type> | <CPU or GPU model> | <threads> | torch <version> | <model fingerprint>"``."""
    device = pipe.device
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else "-"
    return " | ".join([device.type, _processor_name(device), threads, f"torch {torch.__version__}",
                       _fingerprint(pipe)])


def _load_average() -> float | None:
    """The 1-minute load average (``None`` where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def _run_stage(pipe: DuoDiffusion, stage: str, dtype: torch.dtype, condition: torch.Tensor | None,
               num_steps: int) -> tuple[float, float, torch.Tensor]:
    """One sample of ``stage`` in ``dtype`` from fixed noise: ``(denoise seconds, decode seconds, decoded float32
    output (1, C, H, W, D))``."""
    from .attributes import attribute_context
    from .decoding import decode
    from .sampling import denoise, initial_noise, stage_generators
    from .schedulers import make_scheduler

    cfg = pipe.config
    device = pipe.device
    gens = stage_generators([0], stage)
    noise = initial_noise(gens, getattr(cfg, f"{stage}_latent_shape"), device)
    sched = make_scheduler(None, cfg.schedule_of(stage))  # the stage's own sampler (DDIM, or rflow)
    sched.set_timesteps(num_steps, device=device)
    with torch.inference_mode(), autocast(device.type, dtype):
        _sync(device)
        t0 = time.perf_counter()
        if stage == "label":
            _, _, context, null_context = attribute_context(pipe.config, None, 1)
            if context is not None:
                context, null_context = context.to(device), null_context.to(device)
            z = denoise(pipe.label_unet, sched, noise, generators=gens, stochastic=False, progress=False,
                        context=context, null_context=null_context)
        else:
            z = denoise(pipe.image_unet, sched, noise, generators=gens, stochastic=False, progress=False,
                        controlnet=pipe.image_controlnet, condition=condition)
        _sync(device)
        t1 = time.perf_counter()
        out = decode(getattr(pipe, f"{stage}_autoencoder"), z / getattr(cfg, f"{stage}_scale_factor"),
                     tile_size=None)
        _sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out.float()


def measure_dtypes(pipe: DuoDiffusion, *, num_steps: int = NUM_TRIAL_STEPS, repeats: int = 2
                   ) -> dict[str, dict[str, DtypeTrial]]:
    """Time and check every candidate dtype of ``pipe.device`` on both stages (batch 1).

    Per stage, each dtype runs once untimed (kernel selection, caches; its output is the one compared with
    float32's), then the dtypes take turns for ``repeats`` timed rounds, so a changing background load hits them
    alike; the fastest run counts (interference only ever adds time). The image stage is conditioned on the label
    map that the float32 label run decoded.

    Returns:
        ``{stage: {dtype name: DtypeTrial}}`` for stages ``"label"`` and ``"image"``; float32's error is 0.
    """
    candidates = CANDIDATES.get(pipe.device.type, ("float32",))
    names = ["float32", *[c for c in candidates if c != "float32"]]  # float32 first: the reference
    trials: dict[str, dict[str, DtypeTrial]] = {s: {} for s in _STAGES}
    condition = None
    for stage in _STAGES:
        outputs: dict[str, torch.Tensor] = {}
        times: dict[str, list[tuple[float, float]]] = {}
        for name in names:  # 1. untimed first run: output and warm-up
            try:
                outputs[name] = _run_stage(pipe, stage, resolve_dtype(name), condition, num_steps)[2]
                times[name] = []
            except Exception as e:  # noqa: BLE001 - an unsupported dtype is a failed candidate, not an error
                if name == "float32":
                    raise
                first_line = str(e).splitlines()[0][:200] if str(e) else ""
                trials[stage][name] = DtypeTrial(name, float("inf"), float("inf"), float("inf"),
                                                 f"{type(e).__name__}: {first_line}")
        if stage == "label":
            condition = pipe.one_hot(outputs["float32"].argmax(dim=1, keepdim=True))
        for _ in range(repeats):  # 2. timed rounds, the dtypes taking turns
            for name in times:
                times[name].append(_run_stage(pipe, stage, resolve_dtype(name), condition, num_steps)[:2])
        for name in times:  # 3. fastest run per dtype; error of its output against float32's
            error = _relative_error(outputs[name], outputs["float32"])
            trials[stage][name] = DtypeTrial(name, min(t[0] for t in times[name]) / num_steps,
                                             min(t[1] for t in times[name]), error,
                                             "" if error != float("inf") else "non-finite output")
    return trials


def pick_dtype(trials: Mapping[str, Mapping[str, DtypeTrial]], num_inference_steps: int, *,
               tolerance: float = TOLERANCE) -> str:
    """The dtype with the lowest predicted seconds per pair among those within ``tolerance`` in every stage.

    Args:
        trials: ``{stage: {dtype name: DtypeTrial}}`` from :func:`measure_dtypes`.
        num_inference_steps: denoising steps per stage of the run the choice is for.
        tolerance: largest accepted relative error of a stage's output (see :data:`TOLERANCE`).

    Returns:
        a dtype name; ``"float32"`` when no other dtype is both accurate enough and faster.
    """
    best, best_s = "float32", sum(trials[s]["float32"].seconds(num_inference_steps) for s in trials)
    for name in trials[next(iter(trials))]:
        if name == "float32" or not all(name in trials[s] and trials[s][name].error <= tolerance for s in trials):
            continue
        seconds = sum(trials[s][name].seconds(num_inference_steps) for s in trials)
        if seconds < best_s:
            best, best_s = name, seconds
    return best


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("Ignoring the unreadable dtype cache %s (%s); it will be rewritten.", path, e)
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("entries"),
                                                                                               dict):
        return {}
    return data["entries"]


def _trials_from_json(entry: Any) -> dict[str, dict[str, DtypeTrial]] | None:
    try:
        trials = {stage: {name: DtypeTrial(**t) for name, t in entry["trials"][stage].items()} for stage in _STAGES}
    except (KeyError, TypeError, AttributeError):
        return None
    return trials if all("float32" in trials[s] for s in _STAGES) else None


def _write_cache(path: Path, key: str, trials: Mapping[str, Mapping[str, DtypeTrial]]) -> None:
    """Add ``key`` to the cache file (read-modify-write, replaced atomically; a failure only logs a warning)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path)
        entries[key] = {
            "measured": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "load_average": _load_average(),
            "tolerance": TOLERANCE,
            "trials": {s: {n: dataclasses.asdict(t) for n, t in trials[s].items()} for s in trials},
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _CACHE_VERSION, "entries": entries}, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("Could not write the dtype cache %s (%s); dtype='auto' will measure again in the next "
                       "process. Set %s to a writable folder.", path, e, CACHE_ENV)


def choose_dtype(
    pipe: DuoDiffusion,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    *,
    cache_path: str | os.PathLike | None = None,
    measure: Callable[[DuoDiffusion], Mapping[str, Mapping[str, DtypeTrial]]] | None = None,
    tolerance: float = TOLERANCE,
) -> torch.dtype:
    """What ``dtype="auto"`` means for ``pipe`` on its device: the fastest dtype within ``tolerance``.

    Measures with ``measure`` (default :func:`measure_dtypes`) the first time a (device, processor, threads,
    torch, model) combination is seen, and caches the measurements in memory and in ``cache_path``.

    Args:
        pipe: the model, on the device it will sample on (float32 weights).
        num_inference_steps: denoising steps per stage of the run (weighs step time against decode time).
        cache_path: the JSON cache file; default ``cache_dir() / CACHE_FILE``.
        measure: the measuring function (tests pass a fake one).
        tolerance: largest accepted relative error of a stage's decoded output (see :data:`TOLERANCE`).

    Returns:
        ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``; the weights' dtype, without measuring, for a
        pipeline whose weights are not float32 (autocast must match them).

    Raises:
        ValueError: ``$DUODIFF_AUTO_DTYPE`` names no dtype.
    """
    if pipe.dtype != torch.float32:
        return pipe.dtype
    forced = os.environ.get(AUTO_DTYPE_ENV)
    if forced:
        try:
            return resolve_dtype(forced) or torch.float32
        except ValueError as e:
            raise ValueError(f"{AUTO_DTYPE_ENV}={forced!r} is not a dtype; set it to float32, bfloat16 or float16, "
                             "or unset it to let dtype='auto' measure.") from e
    path = Path(cache_path) if cache_path is not None else cache_dir() / CACHE_FILE
    key = cache_key(pipe)
    memo_key = f"{path}::{key}"
    with _lock:  # one measurement per process even when several threads ask at once
        trials = _memo.get(memo_key)
        if trials is None:
            trials = _trials_from_json(_read_cache(path).get(key))
        if trials is None:
            t0 = time.perf_counter()
            trials = {s: dict(v) for s, v in (measure or measure_dtypes)(pipe).items()}
            logger.info("dtype='auto': measured %s on %s in %.1f s", ", ".join(trials["label"]), key.split(" | ")[1],
                        time.perf_counter() - t0)
            others = busy_cores_of_others(0.2) if pipe.device.type == "cpu" else None
            if others is not None and others >= 0.5:
                logger.warning("dtype='auto' timed the dtypes while other processes kept %.1f CPU cores busy, so its "
                               "choice may not hold on an idle machine; delete %s to measure again.", others, path)
            _write_cache(path, key, trials)
        _memo[memo_key] = trials
    name = pick_dtype(trials, num_inference_steps, tolerance=tolerance)
    logger.info("dtype='auto' -> %s for %d steps (%s)", name, num_inference_steps, key)
    return resolve_dtype(name)
