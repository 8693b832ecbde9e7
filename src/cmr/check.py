"""Check settings and sources before any stage runs, so a typo costs seconds, not an output.

``dvc repro`` deletes a stage's outputs before it runs the stage's command, so a
setting that is only checked when its stage starts (a loss name, a reader option, a
missing source) is found after the previous good output is gone, and maybe after
hours of earlier stages. :func:`check_settings` finds all of them at once, in a few
seconds, and ``make run``, ``cmr pipeline`` and the flows run it before anything
else. (A first DVC stage that checks would not do: DVC deletes the outputs of a
stage whose dependency is missing, and the check stage would itself be an output
that every stage depends on, so every change to it would rerun everything.)

Loading ``params.yaml`` already refuses an unknown key (``finetune.epoch``); this
adds what the schema cannot know: that names are registered, options fit, the
source exists and the output folders can be written.
"""
from __future__ import annotations

from pathlib import Path

from cmr.config import Params
from cmr.errors import CmrError, ConfigError


def _source(p: Params) -> None:
    source = Path(p.data.source)
    if not source.exists():
        raise ConfigError(f"{source}: no such file or folder")


def _reader(p: Params) -> None:
    from cmr.data.readers import READERS

    READERS.get(p.data.reader)


def _reader_options(p: Params) -> None:
    from cmr.data.readers import READERS

    if p.data.reader in READERS:
        READERS.get(p.data.reader).check_options(dict(p.data.options))


def _arch(p: Params) -> None:
    """A registered architecture that takes the modality pair (and, for cmmixer, a registered mixer)."""
    from cmr.models.cmmixer import CMMIXER_ARCHS, MIXERS
    from cmr.stages._methods import require_pair

    require_pair(p)
    if p.model.arch in CMMIXER_ARCHS:
        MIXERS.get(p.cmmixer.mixer)
        return
    from cmr.models import resolve_arch

    resolve_arch(p.model.arch)


def _shard_size(p: Params) -> None:
    from cmr.stages._methods import require_shardable

    require_shardable(p)


def _losses(section: str):
    def check(p: Params) -> None:
        from cmr.losses import build_loss

        cfg = getattr(p, section)
        # two classes, so a class-wise loss passes here; the dataset's labels are checked at training
        try:
            build_loss(cfg.losses, cfg.loss_options, p.model.embed_dim, 2)
        except ConfigError as e:
            raise ConfigError(str(e).removeprefix("losses: ")) from None

    return check


def _higher_is_better(setting: str):
    def check(p: Params) -> None:
        from cmr.retrieval.metrics import require_higher_is_better

        section, key = setting.split(".")
        require_higher_is_better(getattr(getattr(p, section), key), key)

    return check


def _calibrator(p: Params) -> None:
    from cmr.retrieval.calibrate import option_grid

    option_grid(p.calibrate.method, p.calibrate.options)


def _index(p: Params) -> None:
    from cmr.retrieval.index import INDEXES

    INDEXES.get(p.index.kind)


def _outputs(p: Params) -> None:
    from cmr.io import check_writable

    for name, path in p.paths.model_dump().items():
        check_writable(path)


#: (the setting a failure is about, its check); each check raises a CmrError
CHECKS = (("data.source", _source), ("data.reader", _reader), ("data.options", _reader_options),
          ("model.arch", _arch), ("encode.shard_size", _shard_size),
          ("pretrain.losses", _losses("pretrain")), ("finetune.losses", _losses("finetune")),
          ("pretrain.select_metric", _higher_is_better("pretrain.select_metric")),
          ("finetune.select_metric", _higher_is_better("finetune.select_metric")),
          ("calibrate.method", _calibrator), ("index.kind", _index),
          ("register.metric", _higher_is_better("register.metric")), ("paths", _outputs))


def check_settings(p: Params) -> None:
    """Run every check; a ConfigError lists each problem found, one line each, prefixed with
    its setting. Returns None when all pass."""
    problems = []
    for setting, check in CHECKS:
        try:
            check(p)
        except CmrError as e:
            problems.append(f"{setting}: {e}")
    if problems:
        raise ConfigError("\n".join(problems))
