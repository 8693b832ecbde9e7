"""The registered MLflow model: a pyfunc that embeds texts (column ``text``) or images (column ``image_path``).

It is logged as code (MLflow's models-from-code, :mod:`cmr.tracking.pyfunc_model`), not
pickled: loading a registered version runs this installed code and reads tensors from
safetensors files, and unpickles nothing.
"""
from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd

#: the file MLflow runs to get the model object (``mlflow.models.set_model``)
MODEL_CODE = str(Path(__file__).with_name("pyfunc_model.py"))


class TwoTowerEncoder(mlflow.pyfunc.PythonModel):
    """``predict(DataFrame)`` -> float32 [rows, D] L2-normalised embeddings.

    Two-tower models embed ``text`` or ``image_path``; a cmmixer retriever embeds the media of its
    pair (``video_path``, ``audio_path`` or ``image_path``), each with its own tower.
    """

    def load_context(self, context):
        from cmr.io import read_json
        from cmr.models.checkpoint import SPEC_FILE

        folder = Path(context.artifacts["model_dir"])
        self.media = read_json(folder / SPEC_FILE, dict).get("kind") == "retriever"
        if self.media:
            from cmr.models.cmmixer import load_cmmixer

            self.retriever, spec = load_cmmixer(folder, device="cpu")
            self.settings = spec["settings"]
            self.retriever.eval()
            return
        from cmr.tracking.model_package import load_packaged

        self.bundle = load_packaged(folder, device="cpu")
        self.bundle.model.eval()

    def _predict_media(self, model_input: pd.DataFrame):
        import torch

        from cmr.data.media import MediaSpec, decode_media

        spec = MediaSpec(**self.settings["media"])
        sides = {self.settings["gallery"]: "a", self.settings["query"]: "b"}
        columns = [c for c in model_input if c.removesuffix("_path") in sides]
        if len(columns) != 1:
            raise ValueError(f"give one column of {[m + '_path' for m in sides]}, got {list(model_input)}")
        modality = columns[0].removesuffix("_path")
        x = torch.stack([decode_media("/", str(Path(p).resolve()), modality, spec) for p in model_input[columns[0]]])
        with torch.no_grad():
            return self.retriever(x, sides[modality]).float().numpy()

    def predict(self, context, model_input: pd.DataFrame, params=None):
        import numpy as np
        import torch
        from PIL import Image

        if self.media:
            return self._predict_media(model_input).astype(np.float32)
        m = self.bundle.model
        with torch.no_grad():
            if "image_path" in model_input:
                pixels = torch.stack([self.bundle.preprocess_val(Image.open(p).convert("RGB"))
                                      for p in model_input["image_path"]])
                out = m.encode_image(pixels)
            else:
                out = m.encode_text(self.bundle.tokenizer([str(t) for t in model_input["text"]]))
        return out.float().numpy().astype(np.float32)
