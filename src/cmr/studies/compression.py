"""``cmr study compression``: size, encode speed and retrieval quality of compressed models vs the teacher.

Rows: the teacher (the pipeline's fine-tuned model, else fresh towers), its dynamic int8
copy, a text student with fewer MiniLM layers distilled from the teacher on the *train*
captions, and that student quantised. Quality is instance-level R@1/5/10 on the test
split of ``p.data`` (openclipart_mini by default); speed is items/s in this process, same
batch size for every row, best of ``repeats`` passes.

Cells: the four measured rows (:func:`measure`) are independent and run on ``p.task_runner``
(:mod:`cmr.studies.fanout`); the distillation that the student rows need runs before them, on
the driver. Speed is timed where a row runs: on a Dask cluster beside other cells, so the speed
columns compare rows only when each ran alone on like workers (the sequential runner, or a
one-worker cluster); sizes and retrieval quality are the same on any runner.
"""
from __future__ import annotations

import time

import torch

from cmr.config import Params
from cmr.data.schema import by_split
from cmr.models.compress import (distill_text, encode_texts, items_per_second, quantize_int8, state_size_mb,
                                 truncate_text_layers)
from cmr.retrieval.evaluation import evaluate_embeddings
from cmr.stages._common import log
from cmr.studies import STUDIES, output_dir
from cmr.studies._common import prepare, save_figure, start_model, write_table
from cmr.studies.fanout import run_cells
from cmr.training.features import load_image, texts_of
from cmr.training.fit import split_features
from cmr.tracking.study import log_study

COLUMNS = ["model", "size_MB", "text_tower_MB", "text_items_per_s", "image_items_per_s", "cos_to_teacher",
           "t2i/R@1", "t2i/R@5", "t2i/R@10", "i2t/R@1", "i2t/R@5", "i2t/R@10"]


def _text_tower_mb(model) -> float:
    return state_size_mb(model.clip.text) + state_size_mb(model.text_head)


def measure(name: str, model, tokenizer, test_texts, text_item, image_feats, pixels, speed_texts, teacher_txt,
            batch_size, repeats, int8: bool = False) -> dict:
    """One row: sizes, throughput and test retrieval of ``model`` (CPU), or with ``int8`` of its dynamic
    int8 copy (made here, so a cell ships the float model). ``model`` itself is not changed.

    image_feats: test backbone image features [N, F_i]; pixels: [P, 3, H, W] for the image speed;
    teacher_txt: the teacher's test text embeddings [T, D] (``cos_to_teacher``)."""
    model = quantize_int8(model) if int8 else model
    model.eval()
    txt = encode_texts(model, tokenizer, test_texts, batch_size)
    with torch.no_grad():
        img = model.head_image(image_feats)
    metrics = evaluate_embeddings(img, txt, text_item, "instance")
    speed_txt = items_per_second(lambda b: model.encode_text(tokenizer(list(b))), speed_texts, batch_size, repeats)
    speed_img = items_per_second(lambda b: model.encode_image(b), pixels, batch_size, repeats)
    return {"model": name, "size_MB": state_size_mb(model), "text_tower_MB": _text_tower_mb(model),
            "text_items_per_s": speed_txt, "image_items_per_s": speed_img,
            "cos_to_teacher": float((txt * teacher_txt).sum(-1).mean()),
            **{k: 100 * metrics[k] for k in COLUMNS if "/R@" in k}}


@STUDIES.register("compression")
def run(p: Params, quick: bool = False) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(p.seed)
    device = "cpu"  # dynamic int8 kernels are CPU kernels; every row is timed on the same device
    prepared = prepare(p)
    bundle, bid = start_model(p, device)
    teacher, tok = bundle.model.eval(), bundle.tokenizer
    test = by_split(prepared.items, "test")
    image_feats = split_features(bundle, prepared, "test", bid, device, p.paths.cache).image
    test_texts, text_item = texts_of(test)
    train_texts, _ = texts_of(by_split(prepared.items, "train"))
    n_layers = len(teacher.clip.text.transformer.encoder.layer)
    keep = [0, n_layers - 1] if quick else list(range(0, n_layers, 2))  # every other layer, from the first
    epochs, batch_size, repeats = (1, 32, 1) if quick else (4, 64, 2)
    if quick:
        train_texts = train_texts[:128]
    n_pix = 8 if quick else 64
    speed_texts = test_texts[:128] if quick else test_texts
    pixels = torch.stack([bundle.preprocess_val(load_image(prepared.root, it.image)) for it in test[:n_pix]])

    teacher_txt = encode_texts(teacher, tok, test_texts, batch_size)
    student = truncate_text_layers(teacher, keep)
    t0 = time.perf_counter()
    history = distill_text(student, teacher, tok, train_texts, epochs=epochs, batch_size=batch_size, lr=5e-5,
                           seed=p.seed, device=device, log=log)
    distill_s = time.perf_counter() - t0
    variants = [("teacher fp32", teacher, False), ("teacher int8 (dynamic)", teacher, True),
                (f"student {len(keep)}L fp32 (distilled)", student, False),
                (f"student {len(keep)}L int8", student, True)]
    shared = dict(tokenizer=tok, test_texts=test_texts, text_item=text_item, image_feats=image_feats, pixels=pixels,
                  speed_texts=speed_texts, teacher_txt=teacher_txt, batch_size=batch_size, repeats=repeats)
    rows = run_cells(measure, [dict(shared, name=name, model=model, int8=int8) for name, model, int8 in variants],
                     p.task_runner, name="compression")
    for row in rows:
        log(f"compression: {row}")

    out = output_dir("compression", quick)
    artifacts = write_table(out, rows, COLUMNS, f"Compression on {prepared.info['name']} test "
                            f"({len(test)} images, {len(test_texts)} texts), CPU, batch {batch_size}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["text_tower_MB"], r["t2i/R@1"] + r["i2t/R@1"], label=r["model"])
    ax.set_xlabel("text tower size (MB)")
    ax.set_ylabel("R@1 t2i + i2t (%)")
    ax.legend(fontsize=7)
    artifacts.append(save_figure(fig, out / "plot.png"))
    plt.close(fig)
    wall = time.perf_counter() - t_start
    cells = [{"name": r["model"], "params": {"model": r["model"]},
              "metrics": {k: v for k, v in r.items() if k != "model"}} for r in rows]
    log_study(uri=p.tracking.uri, experiment=p.tracking.experiment, study="compression", cells=cells,
              artifacts=artifacts, params={"quick": quick, "student_layers": keep, "distill_epochs": epochs,
                                           "distill_texts": len(train_texts), "batch_size": batch_size,
                                           "task_runner": p.task_runner},
              tags={"data_version": prepared.info["data_version"], "backbone_id": bid})
    return {"rows": rows, "distill_history": history, "distill_seconds": distill_s, "wall_seconds": wall}
