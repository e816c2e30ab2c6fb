"""Pretrained weights: PyTorch X3D checkpoints to MindSpore, fine-tuning loads (a .ckpt or an MLflow model), and
export."""

from x3d_exp.weights.convert import (CHECKPOINT_FORMATS, Conversion, WeightsError, convert_checkpoint,
                                     convert_state_dict, detect_format, extract_state_dict, load_params,
                                     load_pretrained, params_num_classes, read_params, save_params)
from x3d_exp.weights.export import export_model, verify_export
from x3d_exp.weights.mlflow_model import is_model_uri, local_checkpoint, model_description
from x3d_exp.weights.torch_pickle import CheckpointError, UnsafeCheckpointError, load_torch_checkpoint

__all__ = ["CHECKPOINT_FORMATS", "CheckpointError", "Conversion", "UnsafeCheckpointError", "WeightsError",
           "convert_checkpoint", "convert_state_dict", "detect_format", "export_model", "extract_state_dict",
           "is_model_uri", "load_params", "load_pretrained", "load_torch_checkpoint", "local_checkpoint",
           "model_description", "params_num_classes", "read_params",
           "save_params", "verify_export"]
