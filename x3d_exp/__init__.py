"""x3d-exp: X3D video recognition experiments on MindSpore, composed with Hydra.

Importing the package does not import MindSpore: `run.py` must set CPU
environment variables (see x3d_exp.env) before MindSpore loads.
"""

__version__ = "0.1.0"
__all__ = ["build_model"]


def __getattr__(name):
    if name == "build_model":
        from x3d_exp.models import build_model

        return build_model
    raise AttributeError(name)
