"""denseflex-onnx: low-rank factorization of ONNX models as a design space exploration."""
__version__ = "0.1.0"

from .api import Result, apply, explore, inspect, optimize, profile_model  # noqa: E402
from .errors import UserError  # noqa: E402

__all__ = ["optimize", "explore", "apply", "inspect", "profile_model", "Result", "UserError", "__version__"]
