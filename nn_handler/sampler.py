"""Samplers: how ``h.sample`` turns a trained model into samples.

A sampler is built from plain keyword arguments through ``h.set_sampler(SamplerClass,
**kwargs)`` (so checkpoints record it) and subclasses :class:`Sampler`. The handler
calls ``sampler.sample(model, sde, shape, steps, ...)`` with the unwrapped model already
in eval mode (holding the EMA weights when EMA is on), under ``torch.no_grad``, and
with a ``torch.Generator`` when a seed was given. Without ``set_sampler`` a
SCORE_BASED handler uses :class:`EulerMaruyama`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["Sampler", "EulerMaruyama", "randn"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def randn(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, from ``generator`` (None: the global stream)."""
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


class Sampler:
    """Base class of samplers; subclass it and implement :meth:`sample`.

    State that should survive save/load (counters, learned step sizes, ...) goes in
    ``state_dict``/``load_state_dict``; the constructor kwargs are recorded by
    ``set_sampler`` and come back on load by themselves.
    """

    def sample(self, model: Any, sde: Any, shape: Sequence[int], steps: int, corrector_steps: int = 0,
               generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None,
               progress_bar: bool = False, **options: Any) -> torch.Tensor:
        """``shape[0]`` samples of shape ``shape[1:]`` on ``device``.

        ``model``: the user's module (a SCORE_BASED one is called as ``model(t, x)``);
        ``sde``: the handler's SDE or None; ``generator``: draw every random number from
        it when given (None: the global stream); ``options``: extra keyword arguments
        given to ``h.sample``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement sample(model, sde, shape, steps, ...)")

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise KeyError(f"{type(self).__name__} has no state but was given {sorted(state)}; "
                           f"override load_state_dict to restore it")


class EulerMaruyama(Sampler):
    """Predictor-corrector sampling of the reverse-time SDE (Song et al., 2021, Algorithms 2-4).

    Predictor: Euler-Maruyama on ``dx = [f(x, t) - g(t)^2 s(t, x)] dt + g(t) dW`` from
    ``t = T`` down to ``t = eps`` in ``steps`` equal steps, starting from the prior.
    Corrector (``corrector_steps`` per time, before each predictor step): Langevin MCMC
    ``x <- x + a s(t, x) + sqrt(2a) z`` with ``a = 2 (snr |z| / |s|)^2`` per sample.
    With ``denoise`` the last step returns its mean (no noise is added at the end).
    """

    def __init__(self, snr: float = 0.16, denoise: bool = True):
        if float(snr) <= 0:
            raise ValueError(f"EulerMaruyama: snr must be > 0, got {snr!r}")
        self.snr = float(snr)
        self.denoise = bool(denoise)

    @torch.no_grad()
    def sample(self, model: ScoreFn, sde: Any, shape: Sequence[int], steps: int, corrector_steps: int = 0,
               generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None,
               progress_bar: bool = False, snr: Optional[float] = None, **options: Any) -> torch.Tensor:
        if options:
            raise TypeError(f"EulerMaruyama.sample got unknown options {sorted(options)} (it takes snr)")
        if sde is None:
            raise RuntimeError("EulerMaruyama samples the reverse of an SDE: set one with h.set_sde(VPSDE, ...)")
        if int(steps) < 1 or int(corrector_steps) < 0:
            raise ValueError(f"need steps >= 1 and corrector_steps >= 0, got {steps!r}, {corrector_steps!r}")
        snr = self.snr if snr is None else float(snr)
        x = sde.prior_sampling(tuple(shape), generator=generator, device=device)
        n = x.shape[0]
        if n == 0:
            return x
        times = torch.linspace(float(sde.T), float(sde.eps), int(steps) + 1, device=x.device, dtype=x.dtype)
        x_mean = x
        # disable=None: shown only when stderr is a terminal (no carriage returns in a redirected log)
        for i in tqdm(range(int(steps)), disable=None if progress_bar else True, desc="sampling", unit="step",
                      leave=False, mininterval=0.5):
            t = times[i].expand(n)
            dt = float(times[i] - times[i + 1])
            for _ in range(int(corrector_steps)):
                x = self.langevin_step(model, x, t, snr, generator)
            drift, g = sde.sde(x, t)
            g = g.reshape(-1, *([1] * (x.dim() - 1)))
            x_mean = x - (drift - g ** 2 * model(t, x)) * dt
            x = x_mean + g * math.sqrt(dt) * randn(x, generator)
        return x_mean if self.denoise else x

    @staticmethod
    def langevin_step(model: ScoreFn, x: torch.Tensor, t: torch.Tensor, snr: float,
                      generator: Optional[torch.Generator]) -> torch.Tensor:
        score = model(t, x)
        z = randn(x, generator)
        score_norm = score.reshape(x.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        noise_norm = z.reshape(x.shape[0], -1).norm(dim=1)
        step = (2.0 * (snr * noise_norm / score_norm) ** 2).reshape(-1, *([1] * (x.dim() - 1)))
        return x + step * score + torch.sqrt(2.0 * step) * z

    def __repr__(self) -> str:
        return f"EulerMaruyama(snr={self.snr}, denoise={self.denoise})"
