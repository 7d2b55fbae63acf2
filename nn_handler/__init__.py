"""nn_handler: a PyTorch model handler whose checkpoints load back whole or in part."""
__version__ = "0.1.0"

from .enums import LoggingMode, ModelType  # noqa: E402
from .handler import NNHandler, NNHandlerWarning  # noqa: E402

__all__ = ["NNHandler", "ModelType", "LoggingMode", "NNHandlerWarning", "__version__"]
