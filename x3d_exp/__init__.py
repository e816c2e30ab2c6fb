"""x3d-exp: X3D video recognition experiments on MindSpore, composed with Hydra."""

from x3d_exp.models import build_model

__all__ = ["build_model"]
__version__ = "0.1.0"
