from x3d_exp.models.x3d import (VARIANTS, X3D, FactorError, X3DSpec, build_from_config, build_model, create_x3d,
                                round_repeats, round_width)

__all__ = ["VARIANTS", "X3D", "FactorError", "X3DSpec", "build_from_config", "build_model", "create_x3d",
           "round_repeats", "round_width"]
