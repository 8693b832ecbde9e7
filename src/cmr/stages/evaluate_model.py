"""``cmr evaluate``: any trained model on any reader's dataset, without training.

The model is a folder written by a training stage (``data/models/finetune``, or the ``model/``
folder inside it) or a registered model (``models:/<name>@<alias>`` or ``models:/<name>/<version>``).
The dataset is read with a registered reader; its test split is evaluated, or every item when
the source has no test split (a COCO folder with only ``captions_val2017.json``). No split is
carved and nothing is calibrated: there is no training bank of this dataset to calibrate with.

Writes, like the evaluate stage, a metrics file (``test.none``, ``random``, ``counts``; no
``val``: nothing is selected here), ``plots/recall_at_k.csv``, and ``evaluation.json`` (what was
evaluated: model, dataset, split, data version, items left out); logs one MLflow run when a
tracking URI is given.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from cmr.config import Params
from cmr.data.prepare import Prepared, data_version
from cmr.data.readers import READERS, ReadResult
from cmr.data.schema import Item
from cmr.errors import CmrError, ConfigError, DataError
from cmr.io import write_json
from cmr.models import load_two_tower
from cmr.models.checkpoint import SPEC_FILE
from cmr.retrieval.evaluation import both_directions, in_percent, positives_t2i, score_matrices
from cmr.stages._common import log, resolve_device
from cmr.stages.evaluate import random_baseline, write_metrics_and_curves
from cmr.training.fit import TRAINING_FILE, backbone_id, file_digest, split_features

SPLIT_CHOICES = ("auto", "test", "all")


def resolve_model(ref: str, tracking_uri: str | None) -> Path:
    """The folder holding ``spec.json`` for a model folder, its parent, or a ``models:/`` URI
    (downloaded from the registry at ``tracking_uri``)."""
    if ref.startswith("models:/"):
        import mlflow
        from mlflow.exceptions import MlflowException

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(ref))
        except (MlflowException, OSError) as e:
            raise CmrError(f"{ref}: not found in the registry at {tracking_uri}: {str(e).splitlines()[0]}") from None
        specs = sorted(local.rglob(SPEC_FILE))  # the pyfunc keeps the two-tower folder as an artifact
        if not specs:
            raise CmrError(f"{ref}: the registered model holds no {SPEC_FILE} (not a cmr two-tower model)")
        return specs[0].parent
    path = Path(ref)
    for folder in (path, path / "model"):
        if (folder / SPEC_FILE).is_file():
            return folder
    raise CmrError(f"{ref}: no model there (no {SPEC_FILE} in it or in its model/ folder)")


def evaluation_items(result: ReadResult, split: str, where: str) -> tuple[list[Item], str, dict[str, int]]:
    """(items to evaluate, the split they came from, items left out and why).

    ``split``: ``test``, ``all``, or ``auto`` (test when the source has a test split, else all).
    Only image-text items can be evaluated by an image-text model; items without an image
    file or without a text are left out and counted; a dataset with none is a DataError.
    """
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"--split {split!r}: one of {', '.join(SPLIT_CHOICES)}")
    has_test = any(it.split == "test" for it in result.items)
    if split == "test" and not has_test:
        raise DataError(where, "has a test split (--split test)", "no item is in a test split; use --split all")
    used = "test" if split == "test" or (split == "auto" and has_test) else "all"
    items = [it for it in result.items if used == "all" or it.split == "test"]
    if not any(it.image for it in items):
        other = sorted({m for it in items for m in ("audio", "video") if getattr(it, m)}
                       | ({"precomputed features"} if result.features else set()))
        raise DataError(where, "image-text items (the model embeds images and texts)",
                        f"no item has an image; the items carry {', '.join(other) or 'texts only'}")
    skipped = {"items_without_image_file": 0, "items_without_text": 0}
    kept = []
    for it in items:
        if not (it.image and (result.root / it.image).is_file()):
            skipped["items_without_image_file"] += 1
        elif not any(t.strip() for t in it.texts):
            skipped["items_without_text"] += 1
        else:
            kept.append(it)
    if not kept:
        raise DataError(where, "at least one item with an image file and a text",
                        f"{len(items)} item(s), none usable: {skipped}")
    return kept, used, {k: v for k, v in skipped.items() if v}


def _backbone_id(model_dir: Path) -> str:
    """The feature-cache name of the model's backbone: the training stage's record when the
    towers were never tuned (so the pipeline's cached features are reused), else the weights."""
    if (model_dir.parent / TRAINING_FILE).is_file():
        return backbone_id(model_dir.parent, "", "")
    return f"tuned:{file_digest(model_dir)}"


def run(model: str, reader: str, source: str, options: dict, *, split: str, level: str, ks: Sequence[int],
        seed: int, out_dir: str, device: str, cache_dir: str | None, tracking_uri: str | None,
        experiment: str) -> dict:
    """Evaluate ``model`` on ``reader(source, **options)``; returns the metrics (as written)."""
    model_dir = resolve_model(model, tracking_uri)
    try:
        read = READERS.get(reader)
    except KeyError as e:
        raise ConfigError(f"--reader: {e.args[0]}") from None
    result = read(Path(source), **dict(options))
    items, used, left_out = evaluation_items(result, split, source)
    # one pseudo-split "test" holding the evaluated items, so features are cached as any split's
    items = [dataclasses.replace(it, split="test") for it in items]
    version = data_version(items, result.root, None)
    prepared = Prepared(items, result.root, None, list(result.label_set), {"data_version": version})
    bundle = load_two_tower(model_dir, device=device)
    fs = split_features(bundle, prepared, "test", _backbone_id(model_dir), device, cache_dir)
    with torch.no_grad():
        img = bundle.model.eval().head_image(fs.image.to(device)).float().cpu()
        txt = bundle.model.head_text(fs.text.to(device)).float().cpu()
    pos = positives_t2i(fs.text_item, img.shape[0], level, fs.labels, fs.identity)
    t2i, i2t = score_matrices(img, txt)
    metrics = in_percent({"test": {"none": both_directions(t2i, i2t, pos, ks)}, "random": random_baseline(pos, ks, seed),
                          "counts": {"test_items": int(img.shape[0]), "test_texts": int(txt.shape[0])}})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics_and_curves(metrics, {"none": (t2i, i2t)}, pos, str(out / "metrics.json"), str(out / "plots"))
    about = {"model": model, "model_dir": str(model_dir), "arch": bundle.spec.arch, "reader": reader,
             "source": str(source), "options": dict(options), "split": used, "level": level, "data_version": version,
             "left_out_by_reader": dict(result.skipped), "left_out_here": left_out}
    write_json(out / "evaluation.json", about)
    if tracking_uri:
        from cmr.tracking.study import log_study

        about["mlflow_run_id"] = log_study(
            uri=tracking_uri, experiment=experiment, study="evaluate",
            cells=[{"name": f"{Path(model).name or model} on {result.name}", "params": about, "metrics": metrics}],
            artifacts=[out / "metrics.json", out / "plots", out / "evaluation.json"],
            tags={"data_version": version, "model": model, "dataset": result.name})
        write_json(out / "evaluation.json", about)
    log(f"evaluate: {model} on {source} ({used}: {img.shape[0]} items, {txt.shape[0]} texts): "
        f"rsum {metrics['test']['none']['rsum']:.1f} -> {out}")
    return metrics


def from_params(p: Params, model: str, reader: str, source: str, options: dict, split: str = "auto",
                out_dir: str | None = None, track: bool = True) -> dict:
    """:func:`run` with the device, evaluation settings, feature cache and tracking of ``p``;
    outputs default to ``<folder of paths.metrics>/evaluate/<source folder name>``."""
    out = out_dir or str(Path(p.paths.metrics).parent / "evaluate" / Path(source).resolve().name)
    return run(model, reader, source, options, split=split, level=p.evaluate.level, ks=p.evaluate.ks, seed=p.seed,
               out_dir=out, device=resolve_device(p.device), cache_dir=p.paths.cache,
               tracking_uri=p.tracking.uri if track else None, experiment=p.tracking.experiment)
