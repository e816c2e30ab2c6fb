"""Pretrained weights: PyTorch X3D checkpoints to MindSpore, fine-tuning loads, and export."""

from x3d_exp.weights.convert import (CHECKPOINT_FORMATS, Conversion, WeightsError, convert_checkpoint,
                                     convert_state_dict, detect_format, extract_state_dict, load_params,
                                     load_pretrained, params_num_classes, read_params, save_params)
from x3d_exp.weights.export import export_model, verify_export
from x3d_exp.weights.torch_pickle import CheckpointError, UnsafeCheckpointError, load_torch_checkpoint

__all__ = ["CHECKPOINT_FORMATS", "CheckpointError", "Conversion", "UnsafeCheckpointError", "WeightsError",
           "convert_checkpoint", "convert_state_dict", "detect_format", "export_model", "extract_state_dict",
           "load_params", "load_pretrained", "load_torch_checkpoint", "params_num_classes", "read_params",
           "save_params", "verify_export"]
