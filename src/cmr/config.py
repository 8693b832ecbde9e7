"""Typed, closed settings: one frozen pydantic model per ``params.yaml`` section.

An unknown key is an error naming the key, where it is, and the nearest valid key.
The config object stops at the entry points (stages, CLI, flows); library
functions take explicit arguments.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cmr.errors import ConfigError
from cmr.registry import nearest


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataCfg(Section):
    reader: str = "openclipart"
    source: str = "data/raw/openclipart_mini"
    options: dict = Field(default_factory=dict)  # reader keyword arguments, checked by the reader
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)
    split_seed: int = 0
    min_text_chars: int = Field(2, ge=1)
    max_text_chars: int = Field(512, ge=1)
    #: rows that break a per-item rule: 'fail' (validate stops, naming the source line) or
    #: 'drop' (ingest removes and reports them: cmr.data.invalid)
    on_invalid: Literal["fail", "drop"] = "fail"
    #: the modality pair: ``gallery`` items are ranked for ``query`` inputs (and back). The item's own
    #: modality is the gallery; texts (several per item) can only be the query side.
    gallery: Literal["image", "video", "audio"] = "image"
    query: Literal["text", "audio", "video", "image"] = "text"

    @model_validator(mode="after")
    def _distinct_pair(self):
        if self.gallery == self.query:
            raise ValueError(f"gallery and query are both {self.gallery!r}; a retrieval pair needs two modalities")
        return self


class MediaCfg(Section):
    """Audio and video "as images": ``frames`` windows of ``size`` x ``size`` pixels tiled side by side
    (T = frames); audio becomes a log-mel image of ``n_mels`` bins x frames*size steps. Bounds are
    checked by the validate stage."""

    frames: int = Field(4, ge=1)
    size: int = Field(64, ge=8)
    sample_rate: int = Field(16000, ge=1000)
    clip_seconds: float = Field(2.0, gt=0)
    n_mels: int = Field(64, ge=8)
    min_seconds: float = Field(0.1, ge=0)
    max_seconds: float = Field(600.0, gt=0)
    min_sample_rate: int = Field(4000, ge=1)
    max_sample_rate: int = Field(192000, ge=1)
    #: an audio file whose RMS level is below this is "silent" (dB relative to full scale)
    min_rms_dbfs: float = -60.0


class CMMixerCfg(Section):
    """The cross-modal mixer + masked autoencoder ("video and audio are images") when ``model.arch`` is a
    ``cmmixer-*`` architecture: pretrain = fuse-then-separate MAE, finetune = the retriever."""

    mixer: str = "cutmix"  # a registered mixer: `cmr list mixers`
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix_loss: bool = False
    #: two towers initialised from the encoder (separate copies), or one shared encoder + modality embedding
    retriever: Literal["two_tower", "shared"] = "two_tower"
    pool: Literal["cls", "mean"] = "cls"
    #: pre-train on both modalities (fuse-then-separate) or on one alone (plain MAE, a study baseline)
    pretrain_on: Literal["both", "gallery", "query"] = "both"


class ModelCfg(Section):
    arch: str = "lite0-minilm"
    pretrained: str = "offline"  # 'offline' towers, an open_clip tag, or a checkpoint path
    embed_dim: int = Field(256, ge=8)
    head: Literal["linear", "mlp", "identity"] = "linear"
    lock_image: bool = True
    lock_text: bool = True


class TrainCfg(Section):
    losses: dict[str, float] = Field(default_factory=lambda: {"infonce": 1.0})
    loss_options: dict[str, dict] = Field(default_factory=dict)
    epochs: int = Field(5, ge=0)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    #: learning rate of unlocked tower parameters; null = ``lr``. Pretrained towers want a far
    #: smaller step than freshly initialised heads (CLIP fine-tuning uses about 1e-5).
    backbone_lr: float | None = Field(None, gt=0)
    #: unlocked towers: keep BatchNorm running statistics fixed (scale/shift still train)
    freeze_bn_stats: bool = True
    weight_decay: float = Field(0.05, ge=0)
    #: top blocks of a locked tower that this stage trains (at ``backbone_lr``), e.g. {text: 2}: the
    #: text tower's last 2 transformer layers; the frozen tower's features stay cached (2 CPU cores
    #: can tune the top of a tower, not all of it). ``model.lock_<tower>: false`` trains the whole tower.
    unfreeze: dict[Literal["image", "text"], Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    #: validation metric that picks the best epoch (never the test split)
    select_metric: str = "val/rsum"


class EncodeCfg(Section):
    #: items a shard: 0 encodes each split whole into <split>.npz; N > 0 streams it in shards of N
    #: items into <split>.shards/, holding one shard's features at a time (two-tower archs)
    shard_size: int = Field(0, ge=0)


class CalibrateCfg(Section):
    method: str = "sinkhorn"
    options: dict = Field(default_factory=dict)
    #: where the query bank comes from; 'test' is the transductive setting and is labelled so
    query_bank: Literal["train", "val", "test"] = "train"
    max_bank: int = Field(5000, ge=1)
    #: sinkhorn only: add the bank queries' own gallery as extra transport columns (dual bank)
    target_bank: bool = True


class IndexCfg(Section):
    kind: str = "flat"
    options: dict = Field(default_factory=dict)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class EvaluateCfg(Section):
    ks: tuple[Annotated[int, Field(ge=1)], ...] = Field((1, 5, 10), min_length=1)
    level: Literal["instance", "class", "identity"] = "instance"


class RegisterCfg(Section):
    #: MLflow registered model name: letters, digits, '_', '-', '.' (it is quoted in registry searches)
    model_name: str = Field("cmr-default", pattern=r"^[A-Za-z0-9][\w.\-]*$", max_length=200)
    metric: str = "val/rsum"
    #: MLflow's alias rule: letters, digits, '_' and '-', not 'latest' and not a version like 'v3'
    alias: str = Field("champion", pattern=r"^[\w\-]+$", max_length=255)

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, alias: str) -> str:
        if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
            raise ValueError("'latest' and version names like 'v3' are reserved by MLflow")
        return alias


class TrackingCfg(Section):
    uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "cmr"


class PathsCfg(Section):
    """Every path the pipeline writes, written once; ``dvc.yaml`` reads them with ``${paths.*}``."""

    prepared: str = "data/prepared"
    validation: str = "data/reports/validation.json"
    pretrained: str = "data/models/pretrain"
    finetuned: str = "data/models/finetune"
    embeddings: str = "data/embeddings"
    calibration: str = "data/calibration"
    index: str = "data/index"
    metrics: str = "data/reports/metrics.json"
    plots: str = "data/reports/plots"
    registry: str = "data/reports/register.json"
    cache: str = "data/cache"


# "register" is a section name the user sees in params.yaml; pydantic warns that it
# shadows ABCMeta.register, which nothing here uses.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(Section):
    seed: int = 0
    #: how studies run their independent cells: sequential | dask | dask:tcp://host:8786 (cmr.studies.fanout)
    task_runner: str = "sequential"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    num_workers: int = Field(0, ge=0)
    data: DataCfg = DataCfg()
    media: MediaCfg = MediaCfg()
    model: ModelCfg = ModelCfg()
    cmmixer: CMMixerCfg = CMMixerCfg()
    pretrain: TrainCfg = TrainCfg()
    finetune: TrainCfg = TrainCfg()
    encode: EncodeCfg = EncodeCfg()
    calibrate: CalibrateCfg = CalibrateCfg()
    index: IndexCfg = IndexCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    register: RegisterCfg = RegisterCfg()
    tracking: TrackingCfg = TrackingCfg()
    paths: PathsCfg = PathsCfg()


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def parse_params(raw: dict, source: str = "params.yaml", overridden: tuple[str, ...] = ()) -> Params:
    """Validate ``raw``; an error names ``source``, or ``--set`` where the key was in ``overridden``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(err["loc"])
            where = ".".join(str(p) for p in loc)
            origin = "--set" if any(where == k or where.startswith(k + ".") for k in overridden) else source
            if err["type"] == "extra_forbidden":
                parent = _model_at(Params, loc)
                hint = nearest(loc[-1], parent.model_fields) if parent else ""
                lines.append(f"{origin}: unknown key '{where}'{hint}")
            else:
                lines.append(f"{origin}: '{where}': {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain
    YAML keeps the last one, so an edited setting would silently lose to its twin)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: " + ("is a folder, not a settings file" if path.is_dir() else "file not found"))
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: '{'.'.join(parents[:depth + 1])}' is a value, not a section")
        node[last] = value
    return parse_params(raw, str(path), tuple(overrides or ()))


def parse_overrides(pairs: list[str]) -> dict:
    """``["a.b=3", "c=[1, 2]"]`` -> ``{"a.b": 3, "c": [1, 2]}`` (values parsed as YAML)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. finetune.epochs=2")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return out
