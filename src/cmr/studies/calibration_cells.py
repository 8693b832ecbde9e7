"""The cells of the calibration study (:mod:`cmr.studies.calibration`): one split of one dataset each.

A cell (:func:`split_cell`) trains every (loss, seed) pair of heads on the frozen backbone
features of one split and scores every calibrator of :data:`CALIBRATORS` on each; cells of
different splits and datasets are independent and run on ``p.task_runner``
(:mod:`cmr.studies.fanout`). A cell is one split, not one (split, loss, seed): its features
(tens of MB for the full openclipart) are then shipped to a worker once for six trainings.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from cmr.data.prepare import Prepared
from cmr.data.schema import by_split
from cmr.embeddings import SplitEmbeddings
from cmr.losses import build_loss
from cmr.progress import progress
from cmr.retrieval.calibrate import TRANSDUCTIVE_SUFFIX
from cmr.retrieval.evaluation import both_directions, positives_t2i
from cmr.stages.calibrate import calibrate_test
from cmr.studies._common import TwoTowerHeads
from cmr.training.engine import head_embeddings, train_heads
from cmr.training.features import FeatureSet, identity_vector, label_matrix

CALIBRATORS = ("none", "dsl", "qbnorm", "inverted_softmax", "sinkhorn_uniform", "sinkhorn", "sinkhorn_dual")
SETTINGS = ("inductive", "transductive")
LOSSES = ("infonce", "ncl")
SPLITS = ("train", "val", "test")
KS = (1, 5, 10)
#: Temperatures tried, as multiples of the model's own (1 / logit scale), the same for
#: every calibrator (Sinkhorn epsilon, DSL temperature, QB-Norm / inverted-softmax 1/beta).
TEMPERATURE_MULTIPLES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
QUICK_MULTIPLES = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Spec:
    """A study calibrator: the registered method, its temperature option and the marginal it uses."""
    method: str
    option: str | None           # the temperature-like option, None for 'none'
    inverse: bool = False        # option is 1 / temperature (beta)
    estimated_marginal: bool = False
    target_bank: bool = False    # inductive only: the bank's own gallery joins the transport problem


SPECS = {"none": Spec("none", None), "dsl": Spec("dsl", "temperature"),
         "qbnorm": Spec("qbnorm", "beta", inverse=True),
         "inverted_softmax": Spec("inverted_softmax", "beta", inverse=True),
         "sinkhorn_uniform": Spec("sinkhorn", "epsilon"),
         "sinkhorn": Spec("sinkhorn", "epsilon", estimated_marginal=True),
         "sinkhorn_dual": Spec("sinkhorn", "epsilon", estimated_marginal=True, target_bank=True)}


def temperature_grid(name: str, temperature: float, multiples=TEMPERATURE_MULTIPLES) -> dict[str, list[float]]:
    """Option grid of calibrator ``name`` around the model's ``temperature``."""
    spec = SPECS[name]
    if spec.option is None:
        return {}
    temps = [round(temperature * m, 6) for m in multiples]
    return {spec.option: [round(1.0 / t, 4) if spec.inverse else t for t in temps]}


def _embed(model, fs: FeatureSet, device: str) -> SplitEmbeddings:
    image, text = head_embeddings(model, fs, device)
    return SplitEmbeddings(image, text, fs.text_item, [], [], fs.labels, fs.identity)


def evaluate_calibrators(emb: dict[str, SplitEmbeddings], temperature: float, multiples, level: str,
                         max_bank: int, seed: int) -> dict[tuple[str, str], dict]:
    """(setting, calibrator) -> {"metrics": test metrics, "chosen": per-direction choice made on validation}.

    The transductive setting has no 'none' cell (it is the inductive one: no bank) and no
    'sinkhorn_dual' cell (the test queries' own gallery is the gallery)."""
    test, train = emb["test"], emb["train"]
    pos = positives_t2i(test.text_item, test.image.shape[0], level, test.labels, test.identity)
    out = {}
    for setting in SETTINGS:
        transductive = setting == "transductive"
        for name in CALIBRATORS:
            spec = SPECS[name]
            if transductive and (name == "none" or spec.target_bank):
                continue
            picked, calibrated, _ = calibrate_test(spec.method, temperature_grid(name, temperature, multiples),
                                                   emb["val"], test, train, train, transductive, max_bank, seed,
                                                   level, KS, estimate_marginal=spec.estimated_marginal,
                                                   target_bank=spec.target_bank)
            chosen = {d: {"method": c.method, "options": c.options} for d, c in picked.items()}
            # every metric of the setting carries its label, also where validation kept 'none'
            metrics = both_directions(calibrated["t2i"].float(), calibrated["i2t"].float(), pos, KS,
                                      suffix=TRANSDUCTIVE_SUFFIX if transductive else "")
            out[setting, name] = {"metrics": metrics, "chosen": chosen}
    return out


def pooled_features(prepared: Prepared, features: dict[str, FeatureSet]) -> tuple[FeatureSet, dict[str, int]]:
    """One FeatureSet of every item of ``prepared`` (its splits' features stacked) and each item id's row."""
    items = [it for split in SPLITS for it in by_split(prepared.items, split)]
    offsets, n = [], 0
    for split in SPLITS:
        offsets.append(n)
        n += features[split].image.shape[0]
    pool = FeatureSet(torch.cat([features[s].image for s in SPLITS]), torch.cat([features[s].text for s in SPLITS]),
                      torch.cat([features[s].text_item + o for s, o in zip(SPLITS, offsets)]),
                      label_matrix(items, prepared.label_set), identity_vector(items))
    return pool, {it.id: row for row, it in enumerate(items)}


def resplit(pool: FeatureSet, row_of: dict[str, int], prepared: Prepared) -> dict[str, FeatureSet]:
    """The features of each split of ``prepared`` (same items as the pool, other split seed)."""
    return {s: pool.subset([row_of[it.id] for it in by_split(prepared.items, s)]) for s in SPLITS}


def split_cell(heads: TwoTowerHeads, features: dict[str, FeatureSet], n_classes: int, *, seeds, loss_options: dict,
               epochs: int, batch_size: int, lr: float, weight_decay: float, select_metric: str, level: str,
               multiples, max_bank: int, device: str) -> list[dict]:
    """Every (loss of :data:`LOSSES`, seed) pair of heads on one split, each with every calibrator.

    ``heads``: the built model's heads (left unchanged); each pair starts from a copy re-initialised
    from its seed. ``features``: train / val / test FeatureSets of the split. Returns one dict per
    pair: loss, seed, best_epoch, temperature (1 / trained logit scale), test_images and
    ``results`` of :func:`evaluate_calibrators`.
    """
    out = []
    pairs = [(loss_name, seed) for loss_name in LOSSES for seed in seeds]
    # a split of a many-caption set takes minutes a pair: a bar (terminal only) inside the study's bar of cells
    for loss_name, seed in progress(pairs, len(pairs), "loss x seed (heads + calibrators)", unit="pair"):
        model = copy.deepcopy(heads)
        torch.manual_seed(seed)
        for head in (model.image_head, model.text_head):
            for module in head.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        loss_fn = build_loss({loss_name: 1.0}, loss_options, model.embed_dim, n_classes)
        trained = train_heads(model, loss_fn, features["train"], features["val"], epochs=epochs,
                              batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                              select_metric=select_metric, seed=seed, device=device, level=level, ks=KS,
                              log=lambda _msg: None)
        emb = {s: _embed(model, fs, device) for s, fs in features.items()}
        temperature = 1.0 / float(model.logit_scale.detach().exp())
        out.append({"loss": loss_name, "seed": seed, "best_epoch": trained.best_epoch, "temperature": temperature,
                    "test_images": int(emb["test"].image.shape[0]),
                    "results": evaluate_calibrators(emb, temperature, multiples, level, max_bank, seed)})
    return out
