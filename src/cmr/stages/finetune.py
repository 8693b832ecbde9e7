"""Stage finetune: continue from the pretrained model on the target dataset (two-tower: objective chosen by
name; cmmixer: the retriever from the pre-trained encoder)."""
from __future__ import annotations

import sys

from cmr.config import Params
from cmr.stages._common import stage_main


def from_params(p: Params):
    from cmr.stages._methods import method_for

    return method_for(p.model.arch).finetune(p)


def main(argv=None) -> int:
    return stage_main("finetune", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
