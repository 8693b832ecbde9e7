"""Stage finetune: continue from the pretrained model on the target dataset, objective chosen by name."""
from __future__ import annotations

import sys

from cmr.config import Params
from cmr.stages._common import stage_main
from cmr.stages.pretrain import run


def from_params(p: Params):
    return run(p, p.paths.pretrained, "finetune", p.paths.finetuned)


def main(argv=None) -> int:
    return stage_main("finetune", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
