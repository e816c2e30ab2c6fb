"""`ckpt=` as an MLflow model: `models:/<name>/<version>`, `models:/<model_id>`, `runs:/<run id>/<model name>`, or
the local folder a train job saved (`<run dir>/mlflow_model`).

A trained model's folder (x3d_exp.tracking.models writes it) holds the network's parameters as a MindSpore .ckpt and
a JSON description (model config, class names, the clip it was trained on); everything that takes `ckpt=` reads
the .ckpt through `local_checkpoint`, and the class names and clip through `model_description`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from x3d_exp.errors import WeightsError

# Inside the MLflow model: artifacts/<WEIGHTS> and artifacts/<DESCRIPTION>.
WEIGHTS = "weights.ckpt"
DESCRIPTION = "x3d_model.json"
URI_SCHEMES = ("models:/", "runs:/")


def is_model_uri(ckpt: str) -> bool:
    return str(ckpt).startswith(URI_SCHEMES)


def local_checkpoint(ckpt: str, tracking_uri: Optional[str] = None) -> str:
    """A local .ckpt path for `ckpt`: a file as it is; an MLflow model (URI, downloaded from the store at
    `tracking_uri`, or a local model folder) as the weights file inside it. Raises WeightsError."""
    ckpt = str(ckpt)
    if is_model_uri(ckpt):
        import mlflow
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        try:
            # MLflow 3.17 resolves models:/ (and a run's logged model) through the global tracking URI, whatever
            # download_artifacts is given: set it for the call.
            with _use_tracking_uri(tracking_uri):
                folder = mlflow.artifacts.download_artifacts(artifact_uri=ckpt, tracking_uri=tracking_uri,
                                                             registry_uri=tracking_uri)
        except Exception as err:  # noqa: BLE001 - MlflowException, or an OSError of the artifact store
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise WeightsError(f"{ckpt}: cannot fetch this MLflow model from {tracking_uri}: {first}") from None
    elif os.path.isdir(ckpt):
        folder = ckpt
    elif os.path.isfile(ckpt):
        return ckpt
    else:
        raise WeightsError(f"{ckpt}: no such file, MLflow model folder or model URI (models:/..., runs:/...)")
    weights = Path(folder) / "artifacts" / WEIGHTS
    if not weights.is_file():
        raise WeightsError(f"{folder} is not an x3d-exp MLflow model (no artifacts/{WEIGHTS})")
    return str(weights)


def model_description(weights: str) -> Optional[dict]:
    """The description saved beside a trained model's weights (class names, clip, model config), or None for a
    plain .ckpt."""
    path = Path(weights).with_name(DESCRIPTION)
    return json.loads(path.read_text()) if path.is_file() else None
