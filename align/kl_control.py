"""Controllers of a KL-penalty coefficient β: a table of pure update rules and a small stateful holder.

An update rule maps ``(β, measured KL, target, n, horizon)`` to the next β, where ``n`` is the number of
rollouts the measurement came from:

- ``fixed``: β stays.
- ``adaptive`` (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2):
  ``e = clip(KL / target − 1, −0.2, 0.2)``, ``β ← β · (1 + e · n / horizon)``.
- ``doubling`` (Schulman et al. 2017, PPO paper §4, "Adaptive KL Penalty Coefficient"):
  ``β ← 2β`` when ``KL > 1.5 · target``, ``β ← β / 2`` when ``KL < target / 1.5``, unchanged otherwise.

`KLController` holds β and the rule and is checkpointed through ``state_dict`` / ``load_state_dict`` so a resumed
run continues with the β it had reached.
"""

from __future__ import annotations

from typing import Any, Callable

KLRule = Callable[[float, float, float, int, int], float]


def _fixed(beta: float, kl: float, target: float, n: int, horizon: int) -> float:
    return beta


def _adaptive(beta: float, kl: float, target: float, n: int, horizon: int) -> float:
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)


def _doubling(beta: float, kl: float, target: float, n: int, horizon: int) -> float:
    if kl > 1.5 * target:
        return beta * 2.0
    if kl < target / 1.5:
        return beta / 2.0
    return beta


KL_CONTROLLERS: dict[str, KLRule] = {"fixed": _fixed, "adaptive": _adaptive, "doubling": _doubling}


class KLController:
    """β and the rule that updates it from each step's measured KL."""

    def __init__(self, beta: float, kind: str = "fixed", target: float = 6.0, horizon: int = 10000):
        if kind not in KL_CONTROLLERS:
            raise ValueError(f"unknown KL controller {kind!r}; valid: {', '.join(KL_CONTROLLERS)}")
        if kind != "fixed" and target <= 0:
            raise ValueError(f"the {kind} KL controller needs a target > 0, got {target}")
        if kind == "adaptive" and horizon <= 0:
            raise ValueError(f"the adaptive KL controller needs a horizon > 0, got {horizon}")
        self.beta = float(beta)
        self.kind = kind
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, kl: float, n: int) -> float:
        """Apply the rule to the KL measured on `n` rollouts; returns the new β."""
        self.beta = float(KL_CONTROLLERS[self.kind](self.beta, float(kl), self.target, int(n), self.horizon))
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "kind": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
