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
    """``predict(DataFrame)`` -> float32 [rows, D] L2-normalised embeddings."""

    def load_context(self, context):
        from cmr.tracking.model_package import load_packaged

        self.bundle = load_packaged(context.artifacts["model_dir"], device="cpu")
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
