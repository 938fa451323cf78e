"""Dynamic reward weights (section 4.4, eq. 10) and the baselines they are compared with.

Every controller keeps one weight per reward component and is updated once per generation
batch with that batch's *success rate* per component (the fraction of the completions to
which the component applies that count as a success; ``None`` when it applies to none):

- ``PIDWeights`` (the paper's controller, made to settle): S_k is an exponential moving
  average of the batch success rate, e_k = mean(S) - S_k, and a PI(D) controller sets
  log w_k = log w0_k + Kp e_k + Ki I_k (+ Kd de_k), renormalised to geometric mean 1 and softly
  clamped (tanh in log space) strictly inside ``(min_weight, max_weight)``; the integral is
  clipped to ``+-integral_limit`` and does not integrate while its weight is saturated in the
  direction of the error (anti-windup). A lagging component (S_k below the mean) has e_k > 0,
  so its weight rises; under constant rates the weights converge to a fixed point inside the
  bounds instead of running into a clamp as eq. 10's multiplicative form does.
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
    """PI(D) control of log w with anti-windup; settles strictly inside the bounds.

    Eq. 10 as written, ``w <- w * exp(u)``, integrates u: under constant success rates the
    errors stay constant, so log w drifts linearly until it hits a clamp (the weights then
    only move between bounds). Here the controller sets log w itself (positional form):

        u_k     = Kp e_k + Ki I_k + Kd (e_k - e_k')
        z_k     = log w0_k + u_k,   minus mean_k(z_k) with ``normalize`` (geometric mean 1)
        log w_k = m + h tanh((z_k - m) / h),  m, h = centre, half-width of [log min, log max]

    The tanh is a soft clamp (slope 1 at the centre), so every weight lies strictly inside
    (min_weight, max_weight) for any finite input. The integral I_k <- clip(I_k + e_k, +-L)
    does not integrate while w_k is saturated (beyond ``saturation`` of the half-width) in the
    direction of e_k (conditional integration). Under constant rates the EMA, hence e, hence
    I (which grows until the clip or the saturation stop) converge, so the weights reach a
    fixed point strictly inside the bounds; a lagging component (e_k > 0) ends above the others.
    """

    kind = "pid"

    def __init__(self, names, initial=None, ema=0.1, *, kp=0.5, ki=0.05, kd=0.0, min_weight=0.1,
                 max_weight=10.0, integral_limit=5.0, normalize=True, saturation=0.95):
        super().__init__(names, initial, ema)
        if not 0 < min_weight < max_weight:
            raise ValueError(f"weight bounds must satisfy 0 < weights.min_weight < weights.max_weight, "
                             f"got [{min_weight}, {max_weight}]")
        if any(not min_weight < w < max_weight for w in self.weights):
            raise ValueError(f"weights.initial {dict(zip(self.names, self.weights))} must lie strictly inside "
                             f"(weights.min_weight, weights.max_weight) = ({min_weight}, {max_weight})")
        if not 0 < saturation < 1:
            raise ValueError(f"the saturation level must be in (0, 1), not {saturation}")
        self.kp, self.ki, self.kd = kp, ki, kd
        self.min_weight, self.max_weight = min_weight, max_weight
        self.integral_limit, self.normalize, self.saturation = integral_limit, normalize, saturation
        self.log_initial = [math.log(w) for w in self.weights]
        self.integral = [0.0] * len(self.names)
        self.previous_error: list[float] | None = None

    def _squash(self, z: float) -> tuple[float, float]:
        """log w from the unbounded z, and where it sits in the band (-1 .. 1)."""
        low, high = math.log(self.min_weight), math.log(self.max_weight)
        centre, half = (low + high) / 2, (high - low) / 2
        position = math.tanh((z - centre) / half)
        return centre + half * position, position

    def _output(self, errors: list[float], previous: list[float]) -> list[float]:
        z = [w0 + self.kp * e + self.ki * i + self.kd * (e - p)
             for w0, e, i, p in zip(self.log_initial, errors, self.integral, previous)]
        if self.normalize:
            mean = sum(z) / len(z)
            z = [v - mean for v in z]
        return z

    def _adapt(self) -> None:
        errors = self.errors()
        previous = self.previous_error or errors
        positions = [self._squash(z)[1] for z in self._output(errors, previous)]
        for k, e in enumerate(errors):
            # Anti-windup: a weight pressed against a bound stops integrating in that direction.
            saturated = (positions[k] >= self.saturation and e > 0) or (positions[k] <= -self.saturation and e < 0)
            if not saturated:
                self.integral[k] = max(-self.integral_limit, min(self.integral_limit, self.integral[k] + e))
        self.weights = [math.exp(self._squash(z)[0]) for z in self._output(errors, previous)]
        self.previous_error = errors

    def state_dict(self) -> dict:
        return {**super().state_dict(), "integral": self.integral, "previous_error": self.previous_error,
                "log_initial": self.log_initial}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.integral = [float(v) for v in state["integral"]]
        self.previous_error = None if state["previous_error"] is None else [float(v) for v in state["previous_error"]]
        self.log_initial = [float(v) for v in state["log_initial"]]


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
    """From the ``weights`` config section (missing keys take the schema's defaults).

    ``initial`` may name fewer components than the run uses (the others start at 1).
    """
    from balancedbio.defaults import with_defaults

    config = with_defaults("weights", config)
    initial_by_name = config.get("initial") or {}
    initial = [float(initial_by_name.get(name, 1.0)) for name in names]
    mode = config["mode"]
    if mode == "pid":
        return PIDWeights(names, initial, config["ema"], kp=config["kp"], ki=config["ki"], kd=config["kd"],
                          min_weight=config["min_weight"], max_weight=config["max_weight"],
                          integral_limit=config["integral_limit"], normalize=config["normalize"],
                          saturation=config["saturation"])
    if mode == "static":
        return StaticWeights(names, initial, config["ema"])
    if mode == "dwa":
        return DWAWeights(names, initial, config["ema"], temperature=config["dwa_temperature"])
    raise ValueError(f"unknown weights.mode {mode!r}: expected pid, static or dwa")
