"""Encode throughput of the pipeline against a bare open_clip forward on the same model, in one process.

Pipeline: what the encode stage runs, ``compute_backbone_features`` (decode, preprocess,
towers) then the projection heads. Bare: the same images decoded with PIL and transformed
by open_clip's own eval transform, ``model.clip.encode_image`` / ``encode_text`` in a
plain loop at the same batch sizes, no heads. The two alternate within each repeat, so
load drift hits both; the median of the repeats is reported.

    .venv/bin/python benchmarks/bench_encode.py                    # 256 items of the embedded default
    .venv/bin/python benchmarks/bench_encode.py --items 16 --repeats 1   # quick
"""
from __future__ import annotations

import argparse
import statistics
import time

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from cmr.data.prepare import prepare_dataset
from cmr.models import build_two_tower
from cmr.models.offline_weights import minilm_dir
from cmr.training.features import compute_backbone_features, texts_of


def pipeline_encode(bundle, items, root, batch_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    model = bundle.model
    img, txt, _ = compute_backbone_features(model, bundle.tokenizer, bundle.preprocess_val, items, root,
                                            None, device, batch_size)
    with torch.no_grad():
        return model.head_image(img.to(device)).cpu(), model.head_text(txt.to(device)).cpu()


@torch.no_grad()
def bare_images(clip, transform, paths, batch_size: int, device: str = "cpu") -> torch.Tensor:
    out = []
    for i in range(0, len(paths), batch_size):
        pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]])
        out.append(clip.encode_image(pixels.to(device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def bare_texts(clip, tokenizer, texts, batch_size: int, device: str = "cpu") -> torch.Tensor:
    return torch.cat([clip.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).cpu()
                      for i in range(0, len(texts), batch_size)])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reader", default="openclipart")
    p.add_argument("--source", default="data/raw/openclipart_mini", help="the embedded default dataset")
    p.add_argument("--items", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch; texts use twice this, as the stage does")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both paths run on it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    prepared = prepare_dataset(args.reader, args.source, {}, 0.1, 0.15, 0)
    items = prepared.items[:args.items]
    texts, _ = texts_of(items)
    paths = [prepared.root / it.image for it in items]
    dev = args.device
    bundle = build_two_tower("lite0-minilm", "offline", device=dev)
    model = bundle.model.eval()
    clip = model.clip
    transform = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(clip)), is_train=False)
    # open_clip's own HF tokenizer pads every text to the context length (256); the
    # pipeline's pads to the batch's longest text. Both baselines are timed; the
    # overhead is taken against the faster, which does exactly the pipeline's work.
    oc_tokenizer = open_clip.tokenizer.HFTokenizer(str(minilm_dir()), context_length=bundle.spec.context_length)
    n_img, n_txt, tb = len(items), len(texts), 2 * args.batch_size
    print(f"{n_img} images + {n_txt} texts from {args.source}; lite0-minilm on {dev}, torch threads "
          f"{torch.get_num_threads()}, batch {args.batch_size} images / {tb} texts, {args.repeats} repeats")

    # Same model, same inputs: the bare path must give the pipeline's backbone features.
    ref_img, ref_txt, _ = compute_backbone_features(model, bundle.tokenizer, bundle.preprocess_val, items[:4],
                                                    prepared.root, None, dev, args.batch_size)
    bare_txt = torch.nn.functional.normalize(bare_texts(clip, oc_tokenizer, texts[:len(ref_txt)], tb, dev), dim=-1)
    print(f"max |pipeline - bare| on 4 items: image {float((ref_img - bare_images(clip, transform, paths[:4], 4, dev)).abs().max()):.2e}, "
          f"text {float((ref_txt - bare_txt).abs().max()):.2e}")

    # Round 0 is a warm-up (oneDNN builds its kernels per input shape) and is not counted.
    runs = {k: [] for k in ("pipeline", "bare image", "bare text, open_clip tokenizer", "bare text, pad to longest")}
    for _ in range(args.repeats + 1):
        runs["pipeline"].append(timed(lambda: pipeline_encode(bundle, items, prepared.root, args.batch_size, dev)))
        runs["bare image"].append(timed(lambda: bare_images(clip, transform, paths, args.batch_size, dev)))
        runs["bare text, open_clip tokenizer"].append(timed(lambda: bare_texts(clip, oc_tokenizer, texts, tb, dev)))
        runs["bare text, pad to longest"].append(timed(lambda: bare_texts(clip, bundle.tokenizer, texts, tb, dev)))
    runs = {k: v[1:] for k, v in runs.items()}
    # Other jobs on the machine only ever add time, so the best round is reported too.
    for label, stat in (("median", statistics.median), ("best", min)):
        t = {k: stat(v) for k, v in runs.items()}
        bare = t["bare image"] + min(t["bare text, open_clip tokenizer"], t["bare text, pad to longest"])
        bare_oc = t["bare image"] + t["bare text, open_clip tokenizer"]
        print(f"{label} of {args.repeats}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()))
        print(f"  {label}: pipeline {n_img / t['pipeline']:.1f} items/s, bare open_clip {n_img / bare:.1f} items/s "
              f"(an item is an image with its texts, {n_txt / n_img:.2f} texts per item)")
        print(f"  {label}: overhead ratio pipeline / bare open_clip: {t['pipeline'] / bare:.3f} (target <= 1.10); "
              f"against open_clip's own tokenizer (pad to {bundle.spec.context_length}): {t['pipeline'] / bare_oc:.3f}")

if __name__ == "__main__":
    main()
