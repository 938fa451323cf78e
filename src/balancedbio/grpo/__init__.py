"""Capability-aware GRPO (section 4, Algorithm 1), shaped like TRL's ``trl/experimental/<algo>/`` trainers.

- ``sampler``: stratified batches; ``advantages``: eq. 11 (pure functions);
- ``dynamic_sampling`` and ``aoc``: mixins of the trainer; ``trainer``: ``BalancedGRPOTrainer``;
- ``signals``: the method's per-step signals as TRL metrics, and ``dynamics.jsonl`` from the log history;
- ``run``: dataset, config, trainer, resume, outputs of one variant.
"""

from balancedbio.grpo.advantages import ADVANTAGE_AGGREGATIONS, weighted_component_advantages
from balancedbio.grpo.aoc import _fp32_forward
from balancedbio.grpo.run import (build_prompt_dataset, build_trainer, grpo_config, plot_dynamics, read_dynamics,
                                  run_grpo)
from balancedbio.grpo.sampler import CAPABILITIES, StratifiedRepeatSampler
from balancedbio.grpo.signals import dynamics_rows
from balancedbio.grpo.trainer import (STATE_FILE, BalancedGRPOTrainer, CriticAdvantageTrainer,
                                      StratifiedGRPOTrainer)
from balancedbio.models import lora_config, save_merged
from balancedbio.variants import ABLATION_VARIANTS, DEFAULT_VARIANTS, GROUP_SIZES, variant_settings

__all__ = ["ABLATION_VARIANTS", "ADVANTAGE_AGGREGATIONS", "BalancedGRPOTrainer", "CAPABILITIES",
           "CriticAdvantageTrainer", "DEFAULT_VARIANTS", "GROUP_SIZES", "STATE_FILE", "StratifiedGRPOTrainer",
           "StratifiedRepeatSampler", "_fp32_forward", "build_prompt_dataset", "build_trainer", "dynamics_rows",
           "grpo_config", "lora_config", "plot_dynamics", "read_dynamics", "run_grpo", "save_merged",
           "variant_settings", "weighted_component_advantages"]
