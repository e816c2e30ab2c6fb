"""x3d-exp: X3D video recognition experiments on MindSpore, composed with Hydra.

Importing the package does not import MindSpore; it sets the CPU environment variables MindSpore must see before
its first convolution (x3d_exp.env.configure_environment), so import it before MindSpore.
"""

from x3d_exp.env import configure_environment

configure_environment()

__version__ = "0.1.0"
__all__ = ["build_model"]


def __getattr__(name):
    if name == "build_model":
        from x3d_exp.models import build_model

        return build_model
    raise AttributeError(name)
