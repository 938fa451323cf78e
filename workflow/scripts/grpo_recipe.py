"""Rule grpo_recipe: one variant's GRPO recipe, the YAML `balancedbio train grpo --config` runs (rule grpo).

The recipe (``balancedbio.variants.grpo_recipe``: the variant's settings of the run's config, as
BalancedGRPOConfig, TRL ModelConfig and path fields) arrives as the rule's parameter; written
atomically, it stays beside the variant's results as the record of what trained it.
"""

import yaml

from balancedbio.io import atomic_file
from balancedbio.logs import setup_rule_logging

snakemake = globals()["snakemake"]
log = setup_rule_logging(snakemake.log[0])
recipe = dict(snakemake.params.recipe)
with atomic_file(snakemake.output[0]) as handle:
    handle.write(f"# GRPO recipe of variant {recipe['variant']}, written by the workflow from its config.\n"
                 f"# Run it with: balancedbio train grpo --config {snakemake.output[0]}\n")
    yaml.safe_dump(recipe, handle, sort_keys=False)
log.info("wrote %s (%d fields)", snakemake.output[0], len(recipe))
