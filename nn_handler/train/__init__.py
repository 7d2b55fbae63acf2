"""The training loop, in parts a newcomer can read in order.

``settings`` (what ``train`` keeps between calls), ``progress`` (epochs, steps, where an epoch
stands), ``step`` (one micro-step and optimizer step), ``evaluate`` (the forward, validation),
``preemption`` (stopping on a signal), and ``loop`` (the epochs, over a ``LoopContext``).
Nothing here imports the handler or the checkpointing package: the handler builds the context,
and the loop saves only through the context's ``save``.
"""
from .evaluate import autocast_context, evaluate, make_forward, to_device
from .loop import LoopContext, check_ready, run
from .preemption import Preempted
from .progress import Averages, Position, Progress
from .settings import TrainSettings

__all__ = ["run", "evaluate", "make_forward", "check_ready", "TrainSettings", "Progress", "Position", "Averages",
           "Preempted", "autocast_context", "to_device", "LoopContext"]
