"""What the studies share: data, the model to start from, the heads a cell trains, outputs."""
from __future__ import annotations

import copy
import csv
import io
from pathlib import Path
from typing import Sequence

from torch import nn

from cmr.config import Params
from cmr.data.prepare import Prepared, prepare_dataset
from cmr.io import atomic_path, write_text
from cmr.models import TwoTower, build_two_tower, load_two_tower
from cmr.training.fit import backbone_id


def prepare(p: Params, reader: str | None = None, source: str | None = None, options: dict | None = None) -> Prepared:
    """The dataset ``reader``/``source`` (default: ``p.data``) split with ``p.data``'s fractions and seed."""
    return prepare_dataset(reader or p.data.reader, source or p.data.source,
                           p.data.options if options is None else options,
                           p.data.val_fraction, p.data.test_fraction, p.data.split_seed)


def start_model(p: Params, device: str):
    """(bundle, backbone id): the fine-tuned model of the pipeline when it exists, else fresh towers."""
    trained = Path(p.paths.finetuned)
    if (trained / "model").is_dir():
        return load_two_tower(trained / "model", device=device), backbone_id(trained, p.model.arch, p.model.pretrained)
    bundle = build_two_tower(p.model.arch, pretrained=p.model.pretrained, embed_dim=p.model.embed_dim, device=device)
    return bundle, backbone_id(None, p.model.arch, p.model.pretrained)


class TwoTowerHeads(nn.Module):
    """Copies of the trainable part of a :class:`~cmr.models.TwoTower` with locked towers: both heads
    and ``logit_scale``, with the head API that :func:`cmr.training.engine.train_heads` uses.

    A study cell takes this instead of the model: it pickles to a worker in kilobytes where the
    towers weigh about 100 MB, and training it changes nothing in ``model``.
    head_image: backbone features [B, F_i] -> [B, D] unit rows; head_text: [B, F_t] -> [B, D].
    """

    def __init__(self, model: TwoTower):
        super().__init__()
        self.image_head = copy.deepcopy(model.image_head)
        self.text_head = copy.deepcopy(model.text_head)
        self.logit_scale = nn.Parameter(model.logit_scale.detach().clone(),
                                        requires_grad=model.logit_scale.requires_grad)
        self.embed_dim = model.embed_dim

    head_image = TwoTower.head_image
    head_text = TwoTower.head_text


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_table(out_dir: Path, rows: Sequence[dict], columns: Sequence[str], title: str) -> list[Path]:
    """``table.csv`` and ``table.md`` (atomic writes) of ``rows`` in ``columns`` order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(out_dir / "table.csv", buf.getvalue())
    md = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    write_text(out_dir / "table.md", "\n".join(md) + "\n")
    return [out_dir / "table.csv", out_dir / "table.md"]


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path
