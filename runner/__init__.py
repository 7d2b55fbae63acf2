"""runner: the Hydra config-driven experiment runner over nn_handler.

``python -m runner [overrides]`` trains, resumes, fine-tunes or infers, as the ``task``
config group says; see ``runner/conf`` for every key and README's "Runner" section.
"""
from . import resolvers as _resolvers  # noqa: F401  registers the resolvers the configs use

__all__: list = []
