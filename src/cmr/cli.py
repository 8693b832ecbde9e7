"""``cmr``: run a stage, the whole pipeline, or search the latest index.

    cmr stage finetune            # one stage, as dvc.yaml runs it
    cmr pipeline                  # every stage in order, without DVC
    cmr search "a red apple" --k 5
    cmr search --image path.jpg --k 5
    cmr metrics                   # the latest evaluation as a short table
    cmr evaluate data/models/finetune --reader coco --source /data/coco   # any model, any dataset
    cmr study wikipedia           # a registered study (tables, plot, one MLflow parent run)
    cmr list losses               # registered names (readers, losses, calibrators, indexes, archs, mixers, studies)
    cmr check                     # settings, names, source, output folders: what `make run` checks first
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

from cmr.config import load_params, parse_overrides
from cmr.errors import CmrError, DataError

STAGES = ("ingest", "validate", "pretrain", "finetune", "encode", "calibrate", "index", "evaluate", "register")


def _names(module: str, attr: str):
    """``module.attr.names()`` (or ``module.attr()``), importing the module only when asked:
    ``cmr list readers`` should not wait for torch and open_clip to load."""

    def names() -> list[str]:
        obj = getattr(importlib.import_module(module), attr)
        return obj() if callable(obj) and not hasattr(obj, "names") else obj.names()

    return names


#: ``cmr list`` choices -> their names, each importing only what it needs
REGISTRIES = {
    "readers": _names("cmr.data.readers", "READERS"),
    "losses": _names("cmr.losses", "LOSSES"),
    "calibrators": _names("cmr.retrieval.calibrate", "CALIBRATORS"),
    "indexes": _names("cmr.retrieval.index", "INDEXES"),
    "archs": lambda: _names("cmr.models", "list_architectures")() + _names("cmr.models.cmmixer", "CMMIXER_ARCHS")(),
    "mixers": _names("cmr.models.cmmixer", "MIXERS"),
    "studies": _names("cmr.studies", "names"),
}


def check_query(query: str, max_chars: int) -> str:
    """The query, stripped; an empty one or one longer than the texts the pipeline trains on
    (``data.max_text_chars``; the model would silently read only its first tokens) is an error."""
    text = query.strip()
    if not text:
        raise CmrError("the text query is empty; give words to search for")
    if len(text) > max_chars:
        raise CmrError(f"the text query has {len(text)} characters, more than data.max_text_chars={max_chars}: "
                       "the text tower would read only its beginning; shorten it (or raise the setting)")
    return text


def search(params_path: str, query: str | None, image: str | None, k: int,
           overrides: dict | None = None) -> list[dict]:
    """Top-``k`` gallery items for a text (text->image) or an image (image->text)."""
    import torch
    from PIL import Image

    from cmr.data.prepare import load_prepared
    from cmr.io import read_json
    from cmr.models import load_two_tower
    from cmr.retrieval.index import load_index

    if k < 1:
        raise CmrError(f"--k must be >= 1, got {k}")
    p = load_params(params_path, overrides)
    if image is None:
        query = check_query(query or "", p.data.max_text_chars)
    index_dir = Path(p.paths.index)
    if not (index_dir / "gallery.json").exists():
        raise CmrError(f"{index_dir}: no index yet; run `make run` (or `cmr pipeline`) first")
    gallery = read_json(index_dir / "gallery.json", dict)
    if not isinstance(gallery.get("texts"), list) or "calibrated" not in gallery:
        raise DataError(str(index_dir / "gallery.json"), "written by the index stage (texts, calibrated)",
                        "keys missing; rerun `make run`")
    bundle = load_two_tower(Path(p.paths.finetuned) / "model", device="cpu")
    model = bundle.model.eval()
    with torch.no_grad():
        if image is not None:
            if not Path(image).is_file():
                raise CmrError(f"{image}: image file not found")
            try:
                picture = Image.open(image).convert("RGB")
            except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
                raise DataError(image, "a readable image file", str(e)) from None
            q = model.encode_image(bundle.preprocess_val(picture)[None])
            index = load_index(index_dir / "texts")
        else:
            q = model.encode_text(bundle.tokenizer([query]))
            index = load_index(index_dir / "images")
    if gallery["calibrated"]:  # the index carries a calibration bias as its last dimension
        q = torch.cat([q, torch.ones(1, 1)], dim=1)
    scores, ids = index.search_ids(q.float().numpy(), k)
    prepared = load_prepared(p.paths.prepared)
    by_id = {it.id: it for it in prepared.items}
    hits = []
    for score, hit in zip(scores[0].tolist(), list(ids[0])):
        item_id = str(hit).split("#")[0]
        it = by_id.get(item_id)
        if "#" in str(hit):
            row = int(str(hit).split("#")[1])
            if row >= len(gallery["texts"]):
                raise DataError(str(index_dir / "gallery.json"), "matches the index",
                                f"the index returned text row {row}, gallery.json has {len(gallery['texts'])}; "
                                "rerun `make run`")
            text = gallery["texts"][row]
        else:
            text = it.texts[0] if it and it.texts else ""
        hits.append({"score": round(float(score), 4), "id": item_id, "text": text,
                     "image": str(prepared.root / it.image) if it and it.image else None})
    return hits


def studies_error(studies, name: str) -> str:
    try:
        studies.get(name)
    except KeyError as e:
        return e.args[0]
    return ""


def metrics_table(metrics: dict, ks=(1, 5, 10), chosen: dict | None = None) -> str:
    """The evaluate stage's metrics file (every metric in percent) as a short text table.

    ``chosen`` (calibration.json's per-direction choice) is printed under the table, so a
    calibrated row that equals the uncalibrated one is explained, not mislabelled.
    """
    # `cmr evaluate` selects nothing, so its metrics have no validation row
    rows = [("validation (selection)", metrics["val"])] if "val" in metrics else []
    rows += [(f"test, {'uncalibrated' if name == 'none' else name}", m) for name, m in metrics["test"].items()]
    rows.append(("test, random ranking", metrics["random"]))
    # metrics files of other modality pairs name their directions (t2i = query -> gallery)
    names = metrics.get("pair", {}).get("directions", {"t2i": "t2i", "i2t": "i2t"})
    head = " ".join(f"{names[d]} R@{k}".rjust(8) for d in ("t2i", "i2t") for k in ks) + "    rsum"
    lines = [" " * 26 + head]
    for name, m in rows:
        cells = " ".join(f"{m[f'{d}/R@{k}']:8.1f}" for d in ("t2i", "i2t") for k in ks)
        lines.append(f"{name:<26}{cells}  {m['rsum']:6.1f}")
    if chosen:
        picks = ", ".join(f"{names.get(d, d)} {c['method']} {c.get('options') or ''}".rstrip()
                          for d, c in sorted(chosen.items()))
        lines.append(f"calibration chosen on validation: {picks}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmr", description="Cross-modal retrieval study pipeline.")
    ap.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting for this run, e.g. --set finetune.epochs=2 (YAML value; repeatable)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage", help="run one pipeline stage")
    st.add_argument("name", choices=STAGES)
    sub.add_parser("pipeline", help="run every stage in order (what `dvc repro` runs, without DVC)")
    se = sub.add_parser("search", help="search the latest index")
    se.add_argument("query", nargs="?", help="text query (text -> image)")
    se.add_argument("--image", help="image query (image -> text)")
    se.add_argument("--k", type=int, default=5)
    sy = sub.add_parser("study", help="run a registered study (`cmr list studies`)")
    sy.add_argument("name")
    sy.add_argument("--quick", action="store_true", help="a small version of the study (smoke run)")
    sy.add_argument("--splits", type=int, metavar="N",
                    help="random splits per dataset, for studies that take it (calibration: default 20, 1 with --quick)")
    ev = sub.add_parser("evaluate", help="evaluate a trained model on any reader's dataset, without training")
    ev.add_argument("model", help="a model folder (e.g. data/models/finetune) or models:/<name>@<alias>")
    ev.add_argument("--reader", required=True, help="a registered reader (`cmr list readers`)")
    ev.add_argument("--source", required=True, help="the dataset folder or file")
    ev.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a reader option (repeatable)")
    ev.add_argument("--split", choices=("auto", "test", "all"), default="auto",
                    help="auto (default): the test split, or every item when the source has none")
    ev.add_argument("--out", help="output folder (default: <paths.metrics folder>/evaluate/<source name>)")
    ev.add_argument("--no-mlflow", action="store_true", help="write the files only, log no MLflow run")
    sub.add_parser("metrics", help="the latest evaluation as a short table")
    ls = sub.add_parser("list", help="registered names")
    ls.add_argument("what", choices=tuple(REGISTRIES))
    sub.add_parser("check", help="check settings, names, options, the source and output folders (before a run)")
    for sp in sub.choices.values():  # `cmr stage pretrain --set ...` works as `cmr --set ... stage pretrain`
        sp.add_argument("--params", dest="params_after", default=None, help=argparse.SUPPRESS)
        sp.add_argument("--set", dest="set_after", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.params = args.params_after or args.params
    args.set = args.set + args.set_after
    try:
        stage_argv = ["--params", args.params, *(a for pair in args.set for a in ("--set", pair))]
        if args.cmd == "stage":
            return importlib.import_module(f"cmr.stages.{args.name}").main(stage_argv)
        if args.cmd == "check":
            from cmr.check import check_settings

            check_settings(load_params(args.params, parse_overrides(args.set)))
            print(f"{args.params}: settings, names, source and output folders are fine")
            return 0
        if args.cmd == "pipeline":
            from cmr.check import check_settings

            check_settings(load_params(args.params, parse_overrides(args.set)))  # before any output is replaced
            for name in STAGES:
                rc = importlib.import_module(f"cmr.stages.{name}").main(stage_argv)
                if rc:
                    return rc
            return 0
        if args.cmd == "search":
            if (args.query is None) == (args.image is None):
                ap.error("give either a text query or --image PATH")
            for rank, hit in enumerate(search(args.params, args.query, args.image, args.k, parse_overrides(args.set)), 1):
                print(f"{rank:2d}. {hit['score']:.4f}  {hit['id']}  {hit['text']!r}  {hit['image'] or ''}")
            return 0
        if args.cmd == "study":
            from cmr.studies import load_all

            studies = load_all()
            if args.name not in studies:
                raise CmrError(studies_error(studies, args.name))
            study = studies.get(args.name)
            extra = {} if args.splits is None else {"splits": args.splits}
            if extra and "splits" not in inspect.signature(study).parameters:
                raise CmrError(f"study {args.name!r} has no --splits option")
            study(load_params(args.params, parse_overrides(args.set)), quick=args.quick, **extra)
            return 0
        if args.cmd == "evaluate":
            from cmr.stages.evaluate_model import from_params

            p = load_params(args.params, parse_overrides(args.set))
            metrics = from_params(p, args.model, args.reader, args.source, parse_overrides(args.option), args.split,
                                  args.out, track=not args.no_mlflow)
            print(metrics_table(metrics, ks=p.evaluate.ks))
            return 0
        if args.cmd == "metrics":
            from cmr.io import read_json

            p = load_params(args.params, parse_overrides(args.set))
            path, cal = Path(p.paths.metrics), Path(p.paths.calibration) / "calibration.json"
            if not path.exists():
                raise CmrError(f"{path}: no metrics yet; run `make run` (or `cmr pipeline`) first")
            chosen = read_json(cal, dict).get("chosen") if cal.exists() else None
            try:
                table = metrics_table(read_json(path, dict), ks=p.evaluate.ks, chosen=chosen)
            except (KeyError, TypeError, AttributeError) as e:
                raise DataError(str(path), f"written by the evaluate stage with evaluate.ks {list(p.evaluate.ks)}",
                                f"no {e}; rerun `make run`") from None
            print(table)
            return 0
        if args.cmd == "list":
            print("\n".join(REGISTRIES[args.what]()))
            return 0
    except CmrError as e:
        print(f"cmr: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
