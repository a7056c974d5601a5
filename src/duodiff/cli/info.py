"""``duodiff info``: components, parameter counts, shapes and labels of a model."""

from __future__ import annotations

import argparse

from .common import add_model_argument, add_threads_argument, load_model


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a model (components, parameters, shapes, labels)")
    add_model_argument(p, positional=True)
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import keys
    from ..models import count_parameters

    pipe = load_model(args)
    c = pipe.config
    print(f"volume_shape   {tuple(c.volume_shape)} voxels")
    print(f"spacing        {tuple(c.spacing)} mm")
    print(f"image_channels {c.image_channels}")
    print(f"labels         {', '.join(f'{i}={n}' for i, n in enumerate(c.label_names))}")
    print(f"label latent   {c.label_latent_shape}  scale_factor {c.label_scale_factor:.4g}")
    print(f"image latent   {c.image_latent_shape}  scale_factor {c.image_scale_factor:.4g}")
    for what, s in (("scheduler", c.scheduler), ("image sched.", c.image_scheduler)):
        if s is not None:
            print(f"{what:<14} {s.num_train_timesteps} steps, {s.schedule}, {s.prediction_type}")
    if c.attributes:
        print(f"attributes     {', '.join(c.attributes)}")
    total = 0
    for name in keys.COMPONENTS:
        m = getattr(pipe, name)
        n = count_parameters(m)
        total += n
        print(f"{name:18s} {type(m).__name__:20s} {n:>12,d} parameters")
    print(f"{'total':18s} {'':20s} {total:>12,d} parameters")
    return 0
