"""Dynamic sampling (DAPO): prompt groups whose rewards are all equal are replaced by fresh prompts."""

from __future__ import annotations

import inspect
import json
import random

import torch

from balancedbio.rewards import SUCCESS_COLUMN


class DynamicSamplingMixin:
    """``grpo.resample_constant_groups``: a mixin of ``BalancedGRPOTrainer`` (overrides ``_generate``)."""

    @property
    def _resample_rounds(self) -> int:
        return int(getattr(self.args, "resample_constant_groups", 0) or 0)

    def _generate(self, prompts):
        result = super()._generate(prompts)
        inputs = getattr(self, "_generation_inputs", None)
        if self._resample_rounds and self.model.training and inputs is not None:
            result = self._resample_constant_groups(prompts, inputs, result, self._resample_rounds)
        return result

    def _check_dynamic_sampling(self) -> None:
        if not self._resample_rounds:
            return
        if self.rollout_func is not None or self.tools or self.environment_factories is not None:
            raise ValueError("grpo.resample_constant_groups replaces whole prompt groups of plain generation; it "
                             "does not support a rollout_func, tools or environments (set it to 0)")
        if not all(callable(f) and not isinstance(f, torch.nn.Module) and not inspect.iscoroutinefunction(f)
                   for f in self.reward_funcs):
            raise ValueError("grpo.resample_constant_groups scores candidate groups with the reward functions "
                             "and needs plain synchronous callables (set it to 0)")
        rows = self.args.per_device_train_batch_size * self.args.steps_per_generation
        if rows % self.num_generations:
            raise ValueError(f"grpo.resample_constant_groups needs whole groups on each process: "
                             f"{rows} rows per process do not split into groups of {self.num_generations}")

    def _score_rows(self, inputs: list, prompts: list, completions: list, completion_ids: list):
        """(rows, K) rewards (NaN = not applicable) and each component's per-row success, scored locally."""
        keys = [key for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")]
        columns = {key: [row[key] for row in inputs] for key in keys}
        reported: dict[str, list] = {}  # the success flags each function reports through log_extra
        columns.update(trainer_state=self.state, log_extra=lambda column, values: reported.update({column: values}),
                       log_metric=lambda *a, **k: None)  # a checking call stays out of TRL's metrics
        values = torch.full((len(prompts), len(self.reward_funcs)), float("nan"))
        success = []
        for k, (name, func) in enumerate(zip(self.weight_controller.names, self.reward_funcs)):
            scores = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            values[:, k] = torch.tensor([float("nan") if r is None else float(r) for r in scores])
            success.append(list(reported.get(SUCCESS_COLUMN.format(name=name)) or [None] * len(prompts)))
        return values, success

    def _constant(self, values: torch.Tensor) -> bool:
        """True when no component varies within the group: every advantage of it is 0, whatever the weights."""
        for column in values.T:
            column = column[~torch.isnan(column)]
            if column.numel() > 1 and float(column.max() - column.min()) > 1e-6:
                return False
        return True

    def _global_sum(self, values: list[int]) -> list[int]:
        if self.accelerator.num_processes == 1:
            return values
        total = self.accelerator.reduce(torch.tensor(values, device=self.accelerator.device), reduction="sum")
        return [int(v) for v in total.tolist()]

    @staticmethod
    def _row_key(row: dict) -> str:
        return str(row["key"]) if row.get("key") is not None else json.dumps(row["prompt"], sort_keys=True)

    def _draw_prompts(self, capabilities: list[str], exclude: set, round_index: int) -> list[int]:
        """Dataset indices of fresh prompts, one per requested capability, seeded by (seed, step, rank, round)."""
        if not hasattr(self, "_capability_pools"):
            self._capability_pools: dict[str, list[int]] = {}
            for index, capability in enumerate(self.train_dataset["capability"]):
                self._capability_pools.setdefault(capability, []).append(index)
            self._dataset_keys = [self._row_key(row) for row in self.train_dataset]
        rng = random.Random(f"{self.args.seed}-{self.state.global_step}-{self.accelerator.process_index}-"
                            f"{round_index}")
        picks = []
        for capability in capabilities:
            pool = self._capability_pools[capability]
            fresh = [i for i in pool if self._dataset_keys[i] not in exclude]
            index = rng.choice(fresh or pool)  # a pool smaller than a step's draws repeats prompts
            exclude.add(self._dataset_keys[index])
            picks.append(index)
        return picks

    def _resample_constant_groups(self, prompts: list, inputs: list, result: tuple, rounds: int) -> tuple:
        """Dynamic sampling (DAPO, Yu et al. 2025): a group whose rewards are all equal gets zero advantage in
        every component and adds nothing to the update, nor to S_cos. Up to ``rounds`` times, draw a fresh
        prompt of the same capability for every such group, sample G completions for it, and put it in the
        group's place when its rewards vary. The step keeps its size and its capability mix. Under data
        parallel every process draws as many groups per round as the process with the most constant groups
        (TRL's generation gathers, so every process must generate the same number of rows)."""
        prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images = result
        prompt_ids, completion_ids, completions = list(prompt_ids), list(completion_ids), list(completions)
        logprobs = list(logprobs) if logprobs is not None else None
        size = self.num_generations
        discarded = self._discarded_success

        def discard(success: list, start: int) -> None:
            for name, flags in zip(self.weight_controller.names, success):  # == the reward functions' names
                discarded.setdefault(name, []).extend(flags[start:start + size])

        values, success = self._score_rows(inputs, prompts, completions, completion_ids)
        constant = [g for g in range(len(prompts) // size) if self._constant(values[g * size:(g + 1) * size])]
        constant_before = len(constant)
        drawn = 0
        for round_index in range(rounds):
            need = self.accelerator.gather(torch.tensor([len(constant)], device=self.accelerator.device)).max()
            need = int(need)
            if need == 0:
                break
            wanted = [inputs[g * size]["capability"] for g in constant] or [inputs[0]["capability"]]
            capabilities = [wanted[i % len(wanted)] for i in range(need)]
            exclude = {self._row_key(row) for row in inputs}
            picks = self._draw_prompts(capabilities, exclude, round_index)
            new_inputs = [dict(self.train_dataset[i]) for i in picks for _ in range(size)]
            new_prompts = [row["prompt"] for row in new_inputs]
            kept = {key: len(values_) for key, values_ in self._metrics["train"].items()}
            generated = super()._generate(new_prompts)
            new_prompt_ids, new_completion_ids, _, new_completions, new_logprobs, *_ = generated
            for key, length in kept.items():  # TRL's completion metrics describe the step's first sampling
                del self._metrics["train"][key][length:]
            drawn += need
            new_values, new_success = self._score_rows(new_inputs, new_prompts, new_completions,
                                                       new_completion_ids)
            varied = [j for j in range(need) if not self._constant(new_values[j * size:(j + 1) * size])]
            still, used = [], set()
            for g in constant:
                j = next((j for j in varied if capabilities[j] == inputs[g * size]["capability"]), None)
                if j is None:
                    still.append(g)
                    continue
                varied.remove(j)
                used.add(j)
                discard(success, g * size)
                rows, source = slice(g * size, (g + 1) * size), slice(j * size, (j + 1) * size)
                inputs[rows], prompts[rows] = new_inputs[source], new_prompts[source]
                prompt_ids[rows], completion_ids[rows] = new_prompt_ids[source], new_completion_ids[source]
                completions[rows] = new_completions[source]
                if logprobs is not None:
                    logprobs[rows] = new_logprobs[source]
                for flags, new_flags in zip(success, new_success):
                    flags[rows] = new_flags[source]
            for j in set(range(need)) - used:  # candidates not used: their completions still sampled the policy
                discard(new_success, j * size)
            constant = still
        totals = self._global_sum([constant_before, drawn, len(constant)])
        self._step_record.update(constant_groups_sampled=totals[0], groups_resampled=totals[1],
                                 constant_groups_kept=totals[2])
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

