"""The registered MLflow model: a pyfunc that embeds texts (column ``text``) or images (column ``image_path``)."""
from __future__ import annotations

import mlflow.pyfunc
import pandas as pd


class TwoTowerEncoder(mlflow.pyfunc.PythonModel):
    """``predict(DataFrame)`` -> float32 [rows, D] L2-normalised embeddings."""

    def load_context(self, context):
        from cmr.models import load_two_tower

        self.bundle = load_two_tower(context.artifacts["model_dir"], device="cpu")
        self.bundle.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None):
        import numpy as np
        import torch
        from PIL import Image

        m = self.bundle.model
        with torch.no_grad():
            if "image_path" in model_input:
                pixels = torch.stack([self.bundle.preprocess_val(Image.open(p).convert("RGB"))
                                      for p in model_input["image_path"]])
                out = m.encode_image(pixels)
            else:
                out = m.encode_text(self.bundle.tokenizer([str(t) for t in model_input["text"]]))
        return out.float().numpy().astype(np.float32)
