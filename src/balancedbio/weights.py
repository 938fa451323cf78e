"""Dynamic reward weights (section 4.4, eq. 10) and the baselines they are compared with.

Every controller keeps one weight per reward component and is updated once per generation
batch with that batch's *success rate* per component (the fraction of the completions to
which the component applies that count as a success; ``None`` when it applies to none):

- ``PIDWeights`` (the paper): S_k is an exponential moving average of the batch success
  rate, e_k = mean(S) - S_k, and ``w_k <- w_k * exp(Kp e_k + Ki sum(e_k) + Kd (e_k - e_k'))``.
  A lagging component (S_k below the mean) has e_k > 0, so its weight rises. Weights are
  clamped to ``[min_weight, max_weight]``; the integral is clamped to ``+-integral_limit``
  and stops accumulating while the weight sits on a bound in the direction of the error
  (conditional integration: the usual anti-windup). With ``normalize`` the weights are
  rescaled to geometric mean 1 after each update: GRPO's group normalisation makes only their
  ratios matter, and this keeps all three from drifting into a bound together. (The errors sum
  to zero, so the exponents do too and the rescaling only undoes what clamping shifted.)
- ``StaticWeights``: the ``static_weights`` ablation (Table 2, row b); S_k is still tracked
  and logged so the runs can be compared.
- ``DWAWeights``: Dynamic Weight Average (Liu et al., CVPR 2019), with the failure rate
  1 - S_k standing in for the task loss: w_k = K softmax(r_k / T), r_k = L_k(t-1)/L_k(t-2).

A component that applied to no completion of the batch keeps its S_k (no update), and its
error still counts against the current mean: it has no new evidence.
"""

from __future__ import annotations

import math
from typing import Sequence


class WeightController:
    """Common state: names, weights, EMA success rates; ``update`` returns the new weights."""

    kind = "base"

    def __init__(self, names: Sequence[str], initial: Sequence[float] | None = None, ema: float = 0.1):
        if not 0 < ema <= 1:
            raise ValueError(f"the EMA rate must be in (0, 1], not {ema}")
        self.names = list(names)
        initial = list(initial) if initial is not None else [1.0] * len(self.names)
        if len(initial) != len(self.names):
            raise ValueError(f"{len(initial)} initial weights for {len(self.names)} components {self.names}")
        self.weights = [float(w) for w in initial]
        self.ema = ema
        self.success = [0.0] * len(self.names)  # Algorithm 1, line 3: S = [0, 0, 0]
        self.seen = [False] * len(self.names)
        self.updates = 0

    def observe(self, batch_success: Sequence[float | None]) -> None:
        """Fold one batch's success rates into the moving averages."""
        if len(batch_success) != len(self.names):
            raise ValueError(f"{len(batch_success)} success rates for components {self.names}")
        for k, rate in enumerate(batch_success):
            if rate is None or (isinstance(rate, float) and math.isnan(rate)):
                continue
            # The first observation seeds the average instead of dragging it up from 0 slowly.
            self.success[k] = float(rate) if not self.seen[k] else (1 - self.ema) * self.success[k] + self.ema * rate
            self.seen[k] = True

    def errors(self) -> list[float]:
        mean = sum(self.success) / len(self.success)
        return [mean - s for s in self.success]

    def update(self, batch_success: Sequence[float | None]) -> list[float]:
        self.observe(batch_success)
        self._adapt()
        self.updates += 1
        return list(self.weights)

    def _adapt(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"kind": self.kind, "names": self.names, "weights": self.weights, "success": self.success,
                "seen": self.seen, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind or state.get("names") != self.names:
            raise ValueError(f"weight state for {state.get('kind')} {state.get('names')} cannot be loaded into "
                             f"{self.kind} {self.names}")
        self.weights = [float(w) for w in state["weights"]]
        self.success = [float(s) for s in state["success"]]
        self.seen = [bool(s) for s in state["seen"]]
        self.updates = int(state["updates"])


class StaticWeights(WeightController):
    kind = "static"

    def _adapt(self) -> None:
        pass


class PIDWeights(WeightController):
    kind = "pid"

    def __init__(self, names, initial=None, ema=0.1, *, kp=0.5, ki=0.05, kd=0.0, min_weight=0.1,
                 max_weight=10.0, integral_limit=5.0, normalize=True):
        super().__init__(names, initial, ema)
        if not 0 < min_weight <= max_weight:
            raise ValueError(f"weight bounds must satisfy 0 < min <= max, got [{min_weight}, {max_weight}]")
        self.kp, self.ki, self.kd = kp, ki, kd
        self.min_weight, self.max_weight = min_weight, max_weight
        self.integral_limit, self.normalize = integral_limit, normalize
        self.integral = [0.0] * len(self.names)
        self.previous_error: list[float] | None = None

    def _adapt(self) -> None:
        errors = self.errors()
        previous = self.previous_error or errors
        for k, e in enumerate(errors):
            at_top = self.weights[k] >= self.max_weight and e > 0
            at_bottom = self.weights[k] <= self.min_weight and e < 0
            if not (at_top or at_bottom):  # anti-windup: no integration against a saturated bound
                self.integral[k] = max(-self.integral_limit, min(self.integral_limit, self.integral[k] + e))
            exponent = self.kp * e + self.ki * self.integral[k] + self.kd * (e - previous[k])
            self.weights[k] *= math.exp(max(-20.0, min(20.0, exponent)))
        if self.normalize:
            log_mean = sum(math.log(w) for w in self.weights) / len(self.weights)
            self.weights = [w / math.exp(log_mean) for w in self.weights]
        self.weights = [max(self.min_weight, min(self.max_weight, w)) for w in self.weights]
        self.previous_error = errors

    def state_dict(self) -> dict:
        return {**super().state_dict(), "integral": self.integral, "previous_error": self.previous_error}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.integral = [float(v) for v in state["integral"]]
        self.previous_error = state["previous_error"]


class DWAWeights(WeightController):
    kind = "dwa"

    def __init__(self, names, initial=None, ema=0.1, *, temperature=2.0):
        super().__init__(names, initial, ema)
        if temperature <= 0:
            raise ValueError(f"DWA temperature must be positive, not {temperature}")
        self.temperature = temperature
        self.history: list[list[float]] = []  # failure rates of the last two updates

    def _adapt(self) -> None:
        self.history = (self.history + [[1.0 - s for s in self.success]])[-2:]
        if len(self.history) < 2:
            return  # DWA starts with the initial weights for its first two steps
        older, newer = self.history
        ratios = [n / max(o, 1e-6) for n, o in zip(newer, older)]
        exps = [math.exp(r / self.temperature) for r in ratios]
        total = sum(exps)
        self.weights = [len(exps) * e / total for e in exps]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history = [list(map(float, h)) for h in state["history"]]


def build_weight_controller(config: dict, names: Sequence[str]) -> WeightController:
    """From the ``weights`` config section; ``initial`` may name fewer components than the run uses."""
    initial_by_name = config.get("initial") or {}
    initial = [float(initial_by_name.get(name, 1.0)) for name in names]
    mode = config.get("mode", "pid")
    if mode == "pid":
        return PIDWeights(names, initial, config.get("ema", 0.1), kp=config.get("kp", 0.5), ki=config.get("ki", 0.05),
                          kd=config.get("kd", 0.0), min_weight=config.get("min_weight", 0.1),
                          max_weight=config.get("max_weight", 10.0),
                          integral_limit=config.get("integral_limit", 5.0), normalize=config.get("normalize", True))
    if mode == "static":
        return StaticWeights(names, initial, config.get("ema", 0.1))
    if mode == "dwa":
        return DWAWeights(names, initial, config.get("ema", 0.1), temperature=config.get("dwa_temperature", 2.0))
    raise ValueError(f"unknown weights.mode {mode!r}: expected pid, static or dwa")
