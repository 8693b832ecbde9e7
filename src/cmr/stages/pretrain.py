"""Stage pretrain: what the configured architecture learns first (:mod:`cmr.stages._methods`).

Two-tower archs: contrastive alignment of the two towers on the image-text pairs (towers lockable).
cmmixer archs: the fuse-then-separate masked autoencoder on the gallery/query media pairs.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cmr.config import Params
from cmr.data.prepare import load_prepared
from cmr.stages._common import log, resolve_device, stage_main
from cmr.training.distributed import init_from_env, shutdown
from cmr.training.fit import fit


def train_two_tower(p: Params, init_dir: str | None, section: str, out_dir: str) -> dict:
    """Train with the settings of ``params.<section>`` (pretrain or finetune) and save to ``out_dir``."""
    cfg = getattr(p, section)
    device = resolve_device(p.device)
    dist = init_from_env(device)  # under torchrun: one of WORLD_SIZE data-parallel processes
    result = fit(
        load_prepared(p.paths.prepared), out_dir, arch=p.model.arch, pretrained=p.model.pretrained,
        embed_dim=p.model.embed_dim, head=p.model.head, init_dir=init_dir, lock_image=p.model.lock_image,
        lock_text=p.model.lock_text, losses=cfg.losses, loss_options=cfg.loss_options, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, backbone_lr=cfg.backbone_lr, freeze_bn_stats=cfg.freeze_bn_stats,
        unfreeze=dict(cfg.unfreeze),
        weight_decay=cfg.weight_decay, select_metric=cfg.select_metric, seed=p.seed,
        device=device if dist is None else dist.device, amp=p.amp, level=p.evaluate.level, ks=p.evaluate.ks,
        cache_dir=p.paths.cache, log=lambda m: log(f"{section}: {m}"), workers=p.num_workers, dist=dist,
        # outside the stage's DVC output, which DVC deletes before the stage runs
        resume_dir=str(Path(p.paths.cache) / "resume" / section),
    )
    shutdown(dist)
    return {"best_epoch": result.best_epoch, **result.best}


def from_params(p: Params):
    from cmr.stages._methods import method_for

    return method_for(p.model.arch).pretrain(p)


def main(argv=None) -> int:
    return stage_main("pretrain", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
