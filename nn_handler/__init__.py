"""nn_handler: a PyTorch model handler whose checkpoints load back whole or in part."""
import logging

from .version import __version__

logging.getLogger("nn_handler").addHandler(logging.NullHandler())  # the application configures logging

from .enums import LoggingMode, ModelType  # noqa: E402
from .errors import SettingError  # noqa: E402
from .handler import NNHandler, NNHandlerWarning  # noqa: E402
from .train import Preempted  # noqa: E402

__all__ = ["NNHandler", "ModelType", "LoggingMode", "NNHandlerWarning", "Preempted", "SettingError", "__version__"]
