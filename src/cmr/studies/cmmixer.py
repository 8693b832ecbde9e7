"""``cmr study cmmixer``: does fuse-then-separate pre-training help video<->audio retrieval?

Video <-> audio on ``av_films`` (split by film: one recording never straddles two splits), each row
a pre-training recipe followed by the same contrastive retriever fine-tuning, over several seeds:

* ``scratch``: no pre-training (random init + InfoNCE);
* ``mae video`` / ``mae audio``: a plain MAE on one modality alone;
* ``none``: both modalities' tokens side by side, no mixing (fuse without mixing, CAV-MAE-like);
* ``cutmix`` (the authors' mixer), ``cutmix_clip``, ``mixup``, ``token``: fuse-then-separate;
* the best mixer (by mean *validation* rsum) again at mask ratios 0.5 and 0.9;
* ``random``: the expected metrics of a random ranking.

Every epoch (pre-training and fine-tuning) is chosen on the validation split; the test split is only
reported. Transfer rows: the best mixer's pre-trained encoder fine-tuned for image <-> spoken word
(``gcompris_spoken_words``: a picture's recordings in every language are its matches) and audio <-> image
digits (``fsdd_digits``, AV-MNIST style), both at class level, each against random init. ``av_clips_small`` (less its Big Buck Bunny clips, which repeat
``av_films``) is a zero-shot test of the av_films retrievers.

Cells run on ``p.task_runner`` (:mod:`cmr.studies.fanout`) in waves, each waiting on the one before:
every (recipe, seed) of the main table (:func:`recipe_cell`); the best mixer's mask ratios, chosen
from the first wave's validation rsum; the transfer fine-tunes (:func:`transfer_cell`), which
start from the first wave's encoders. The zero-shot rows only encode, on the driver.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cmr.config import Params
from cmr.data.prepare import Prepared
from cmr.errors import ConfigError
from cmr.models.cmmixer import CMMIXER_ARCHS, encode, finetune, pretrain
from cmr.retrieval.evaluation import direction_names, evaluate_embeddings, positives_t2i
from cmr.stages._common import log, resolve_device
from cmr.stages._methods import media_spec
from cmr.stages.evaluate import random_baseline
from cmr.studies import STUDIES, output_dir
from cmr.studies._common import prepare, save_figure, write_table
from cmr.studies.fanout import run_cells
from cmr.training.av_fit import level_labels, pair_items, split_media, streams, truth
from cmr.tracking.study import log_study

MIXER_ROWS = ("none", "cutmix", "mixup", "token")
REPORTED = ("t2i/R@1", "t2i/R@5", "t2i/R@10", "t2i/MdR", "i2t/R@1", "i2t/R@5", "i2t/R@10", "i2t/MdR", "rsum")


@dataclass(frozen=True)
class Budget:
    seeds: int
    pretrain_epochs: int
    finetune_epochs: int
    transfer_epochs: int
    #: training pairs of a transfer set at most (a seeded subsample; fsdd_digits has 1,317): keeps the
    #: transfer rows' cost near the main table's on 2 CPU cores
    transfer_pairs: int = 300
    batch_size: int = 16
    pretrain_lr: float = 5e-4
    finetune_lr: float = 2e-4


FULL, QUICK = Budget(3, 15, 12, 6), Budget(1, 1, 1, 1)


def _shared() -> Path:
    return Path(os.environ.get("CMR_SHARED_DATASETS", "../shared/datasets"))


@dataclass
class PairData:
    """Decoded media of one dataset for a (gallery, query) pair, per split, plus level and labels."""

    name: str
    gallery: str
    query: str
    level: str
    media: dict  # split -> {modality: tensor}
    labels: dict  # split -> tensor | None

    @classmethod
    def load(cls, name: str, prepared: Prepared, gallery: str, query: str, level: str, spec, cache_dir,
             splits=("train", "val", "test"), max_train: int | None = None, seed: int = 0) -> "PairData":
        items = {s: pair_items(prepared, s, gallery, query) for s in splits}
        if max_train is not None and len(items["train"]) > max_train:
            keep = torch.randperm(len(items["train"]), generator=torch.Generator().manual_seed(seed))[:max_train]
            items["train"] = [items["train"][i] for i in sorted(keep.tolist())]
        media = {s: {m: split_media(prepared, items[s], m, spec, cache_dir) for m in (gallery, query)} for s in splits}
        return cls(name, gallery, query, level, media, {s: level_labels(prepared, items[s], level) for s in splits})

    def scores(self, model, split: str, device: str) -> dict:
        a, b = encode(model, self.media[split][self.gallery], self.media[split][self.query], device=device)
        return evaluate_embeddings(a, b, torch.arange(b.shape[0]), self.level, **truth(self.level, self.labels[split]))

    def random(self, split: str, seed: int) -> dict:
        n = self.media[split][self.gallery].shape[0]
        pos = positives_t2i(torch.arange(n), n, self.level, **truth(self.level, self.labels[split]))
        return random_baseline(pos, (1, 5, 10), seed)


def _pretrain(d: PairData, which: dict, *, arch, mixer, mask_ratio, on, seed, b: Budget, device, amp):
    """The MAE of one recipe; ``on``: the streams it sees ("video", "audio" or both)."""
    data = {s: {m: d.media[s][which[m]] if m in on else None for m in ("video", "audio")} for s in ("train", "val")}
    model, result = pretrain(data["train"]["video"], data["train"]["audio"], data["val"]["video"],
                             data["val"]["audio"], arch=arch, mixer=mixer, mask_ratio=mask_ratio,
                             epochs=b.pretrain_epochs, batch_size=b.batch_size, lr=b.pretrain_lr, weight_decay=0.05,
                             seed=seed, device=device, amp=amp, log=lambda m: None, modalities=on)
    return model.encoder.state_dict(), result.best_epoch


def _finetune(d: PairData, state, *, arch, embed_dim, seed, epochs, b: Budget, device, amp):
    g, q = d.gallery, d.query
    model, result = finetune(state, d.media["train"][g], d.media["train"][q], d.media["val"][g], d.media["val"][q],
                             arch=arch, embed_dim=embed_dim, epochs=epochs, batch_size=b.batch_size,
                             lr=b.finetune_lr, weight_decay=0.05, seed=seed, device=device, amp=amp,
                             log=lambda m: None, labels=d.labels["train"], val_labels=d.labels["val"], level=d.level)
    return model, result


def recipe_cell(data: PairData, which: dict, recipe: tuple | None, seed: int, *, embed_dim: int, arch: str,
                b: Budget, device: str, amp: bool) -> dict:
    """One (recipe, seed) of the main table: pre-training by ``recipe`` ((mixer, mask ratio, streams), or
    None for none), the retriever fine-tuned from it, test scores. Returns {"row": numbers of the table
    row, "encoder": the pre-trained encoder's state (None without pre-training), "retriever": the model}."""
    t0 = time.perf_counter()
    kw = dict(arch=arch, b=b, device=device, amp=amp)
    state, pre_epoch = (None, 0) if recipe is None else _pretrain(data, which, mixer=recipe[0], mask_ratio=recipe[1],
                                                                  on=recipe[2], seed=seed, **kw)
    model, result = _finetune(data, state, embed_dim=embed_dim, seed=seed, epochs=b.finetune_epochs, **kw)
    test = data.scores(model, "test", device)
    row = {"pretrain best epoch": pre_epoch, "finetune best epoch": result.best_epoch, "val rsum": result.best["rsum"],
           **{f"test {m}": test[m] for m in REPORTED}, "seconds": time.perf_counter() - t0}
    return {"row": row, "encoder": state, "retriever": model}


def transfer_cell(data: PairData, state: dict | None, seed: int, *, embed_dim: int, arch: str, b: Budget, device: str,
                  amp: bool) -> dict:
    """A retriever on a transfer set fine-tuned from ``state`` (None: random init): val rsum and test scores."""
    model, result = _finetune(data, state, arch=arch, embed_dim=embed_dim, seed=seed, epochs=b.transfer_epochs, b=b,
                              device=device, amp=amp)
    return {"val rsum": result.best["rsum"], "test": data.scores(model, "test", device)}


def _summary(cells: list[dict], key: str) -> list[dict]:
    """One row per recipe: mean and std over seeds of every reported test metric, and of val rsum."""
    rows = []
    for recipe in dict.fromkeys(c[key] for c in cells):
        group = [c for c in cells if c[key] == recipe]
        row = {key: recipe, "seeds": len(group)}
        for m in ("val rsum", *(f"test {r}" for r in REPORTED)):
            values = np.array([c[m] for c in group], dtype=float)
            row[m] = float(values.mean())
            row[f"{m} std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


@STUDIES.register("cmmixer")
def run(p: Params, quick: bool = False) -> dict:
    t_start = time.perf_counter()
    b = QUICK if quick else FULL
    device = resolve_device(p.device)
    arch = p.model.arch if p.model.arch in CMMIXER_ARCHS else "cmmixer-tiny"
    spec, cache = media_spec(p), p.paths.cache
    shared = _shared()
    # the quick version runs on the settings' own video<->audio data (params/av.yaml: the embedded sample),
    # so it needs nothing outside the repo
    if quick and (p.data.gallery, p.data.query) != ("video", "audio"):
        raise ConfigError("cmr study cmmixer --quick runs on the settings' video<->audio data: "
                          "use --params params/av.yaml (the embedded sample)")
    main_name, main_reader, main_source = ((Path(p.data.source).name, p.data.reader, p.data.source) if quick else
                                           ("av_films", "av_films", str(shared / "av_films")))
    main = PairData.load(main_name, prepare(p, main_reader, main_source, {}), "video", "audio", "instance", spec, cache)
    which = streams("video", "audio")
    seeds = [p.seed + i for i in range(b.seeds)]
    kw = dict(arch=arch, b=b, device=device, amp=p.amp)
    recipes = {"scratch": None} | ({} if quick else {"mae video": ("none", 0.75, ("video",)),
                                                      "mae audio": ("none", 0.75, ("audio",))})
    recipes |= {m: (m, 0.75, ("video", "audio")) for m in (("cutmix",) if quick else MIXER_ROWS)}
    cells, encoders, retrievers = [], {}, {}

    def wave(jobs: list[tuple[str, tuple | None, int]], label: str) -> None:
        """(row name, recipe, seed) cells, run on p.task_runner; rows, encoders and retrievers kept in order."""
        done = run_cells(recipe_cell, [dict(data=main, which=which, recipe=recipe, seed=seed,
                                            embed_dim=p.model.embed_dim, **kw) for _n, recipe, seed in jobs],
                         p.task_runner, name=label)
        for (name, _recipe, seed), out in zip(jobs, done):
            cells.append({"recipe": name, "seed": seed, **out["row"]})
            encoders[(name, seed)], retrievers[(name, seed)] = out["encoder"], out["retriever"]
            log(f"cmmixer study: {name} seed {seed}: val rsum {out['row']['val rsum']:.1f}, "
                f"test rsum {out['row']['test rsum']:.1f} ({out['row']['seconds']:.0f} s)")

    wave([(name, recipe, seed) for seed in seeds for name, recipe in recipes.items()], "cmmixer")
    # the mask ratio of the best mixer, chosen by mean validation rsum (never the test numbers)
    mixers = [r for r in _summary(cells, "recipe") if r["recipe"] in MIXER_ROWS]
    best = max(mixers, key=lambda r: r["val rsum"])["recipe"]
    if not quick:
        wave([(f"{best} mask {ratio}", (best, ratio, ("video", "audio")), seed) for ratio in (0.5, 0.9)
              for seed in seeds], "cmmixer-mask")
    rows = _summary(cells, "recipe")
    random_row = {"recipe": "random ranking", "seeds": 1,
                  **{f"test {m}": v for m, v in main.random("test", p.seed).items() if m in REPORTED}}

    transfer = _transfer(p, quick, best, encoders, seeds, spec, cache, kw) if not quick else []
    zero_shot = [] if quick else _zero_shot(p, best, retrievers, seeds, spec, cache, kw["device"])
    return _report(p, quick, b, main, rows, random_row, transfer, zero_shot, cells, best, t_start)


def _transfer(p: Params, quick: bool, best: str, encoders: dict, seeds: list[int], spec, cache, kw) -> list[dict]:
    """The best mixer's av_films encoder (mask 0.75) fine-tuned on image<->audio sets vs random init."""
    shared = _shared()
    # class level for both: a gcompris picture's recordings in 8 languages are all its matches (the same
    # picture is several gallery items), and fsdd pairs digits by class only
    sets = {"gcompris_spoken_words": ("gcompris_spoken_words", "class"), "fsdd_digits": ("fsdd_digits", "class")}
    out = []
    for name, (reader, level) in sets.items():
        data = PairData.load(name, prepare(p, reader, str(shared / name), {}), "image", "audio", level, spec, cache,
                             max_train=kw["b"].transfer_pairs, seed=p.seed)
        jobs = [(init, seed) for init in ("scratch", f"{best} (av_films)") for seed in seeds]
        done = run_cells(transfer_cell, [dict(data=data, state=None if init == "scratch" else encoders[(best, seed)],
                                              seed=seed, embed_dim=p.model.embed_dim, **kw) for init, seed in jobs],
                         p.task_runner, name=f"cmmixer-{name}")
        for (init, seed), result in zip(jobs, done):
            test = result["test"]
            out.append({"dataset": name, "init": init, "seed": seed, "level": level, "val rsum": result["val rsum"],
                        "test rsum": test["rsum"], "test mAP": test["mAP"], "test t2i/R@1": test["t2i/R@1"],
                        "test i2t/R@1": test["i2t/R@1"]})
            log(f"cmmixer study: transfer {name} {init} seed {seed}: test rsum {test['rsum']:.1f}")
        rnd = data.random("test", p.seed)
        out.append({"dataset": name, "init": "random ranking", "seed": "-", "level": level, "test rsum": rnd["rsum"],
                    "test mAP": rnd["mAP"], "test t2i/R@1": rnd["t2i/R@1"], "test i2t/R@1": rnd["i2t/R@1"]})
    return out


def _zero_shot(p, best: str, retrievers: dict, seeds, spec, cache, device) -> list[dict]:
    """av_clips_small (its BBB clips left out: they repeat av_films' test film) scored by retrievers
    trained on av_films, from scratch and from the best mixer."""
    name = "av_clips_small"
    prepared = prepare(p, "av_clips_small", str(_shared() / name), {})
    items = [it for it in prepared.items if it.video and it.audio and it.meta["group"] != "big_buck_bunny"]
    a = split_media(prepared, items, "video", spec, cache)
    q = split_media(prepared, items, "audio", spec, cache)
    out = []
    for init in ("scratch", best):
        for seed in seeds:
            emb_a, emb_q = encode(retrievers[(init, seed)], a, q, device=device)
            m = evaluate_embeddings(emb_a, emb_q, torch.arange(len(items)), "instance")
            out.append({"init": init, "seed": seed, "items": len(items), "rsum": m["rsum"], "a2v R@1": m["t2i/R@1"],
                        "v2a R@1": m["i2t/R@1"]})
    return out


def _report(p, quick, b, main, rows, random_row, transfer, zero_shot, cells, best, t_start) -> dict:
    names = direction_names("video", "audio")
    out = output_dir("cmmixer", quick)
    shown = lambda m: m.replace("t2i/", names["t2i"] + " ").replace("i2t/", names["i2t"] + " ")  # noqa: E731
    columns = ["recipe", "seeds", "val rsum"] + [f"test {r}" for r in REPORTED]
    table = []
    for r in rows + [random_row]:
        row = {"recipe": r["recipe"], "seeds": r["seeds"]}
        for c in columns[2:]:
            if c in r:
                pct = 1 if ("MdR" in c or "rsum" in c) else 100
                std = f" ± {pct * r[c + ' std']:.1f}" if r["seeds"] > 1 else ""
                row[shown(c)] = f"{pct * r[c]:.1f}{std}"
        table.append(row)
    sizes = {s: main.media[s]["video"].shape[0] for s in ("train", "val", "test")}
    artifacts = write_table(out, table, [shown(c) for c in columns],
                            f"cmmixer: video<->audio on {main.name} ({sizes}), mean ± std over {b.seeds} seed(s); "
                            f"R@K in %, best mixer by validation: {best}")
    if transfer:
        artifacts += _write_extra(out, "transfer", transfer, "Transfer: image<->audio fine-tuning, test split")
    if zero_shot:
        artifacts += _write_extra(out, "zero_shot", zero_shot, "av_clips_small (no BBB), zero-shot, all items")
    artifacts.append(_plot(out, rows, random_row, names))
    log_study(uri=p.tracking.uri, experiment=p.tracking.experiment, study="cmmixer",
              cells=[{"name": f"{c['recipe']} seed {c['seed']}", "params": {"recipe": c["recipe"], "seed": c["seed"]},
                      "metrics": {k: v for k, v in c.items() if isinstance(v, (int, float)) and k != "seed"}}
                     for c in cells],
              artifacts=artifacts, params={"quick": quick, "budget": b.__dict__, "dataset": main.name, "best": best,
                                           "task_runner": p.task_runner})
    return {"rows": rows, "random": random_row, "transfer": transfer, "zero_shot": zero_shot, "best": best,
            "wall_seconds": time.perf_counter() - t_start}


def _write_extra(out: Path, name: str, rows: list[dict], title: str) -> list[Path]:
    sub = out / name
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return write_table(sub, [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                       columns, title)


def _plot(out: Path, rows: list[dict], random_row: dict, names: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [r["recipe"] for r in rows]
    for i, (d, shift) in enumerate((("t2i", -0.2), ("i2t", 0.2))):
        means = [100 * r[f"test {d}/R@10"] for r in rows]
        stds = [100 * r[f"test {d}/R@10 std"] for r in rows]
        ax.bar([j + shift for j in range(len(rows))], means, 0.4, yerr=stds, capsize=2, label=f"{names[d]} R@10")
    for d, style in (("t2i", "--"), ("i2t", ":")):
        ax.axhline(100 * random_row[f"test {d}/R@10"], color="grey", linestyle=style, linewidth=1,
                   label=f"random {names[d]}")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test R@10 (%), mean ± std over seeds")
    ax.legend(fontsize=7)
    path = save_figure(fig, out / "plot.png")
    plt.close(fig)
    return path
