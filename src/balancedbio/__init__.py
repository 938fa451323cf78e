"""BalancedBio: multi-capability alignment of biomedical LLMs (Capability-Aware GRPO).

The Snakemake workflow (``workflow/Snakefile``, ``workflow/rules/``) orchestrates; this package holds the
logic that the thin scripts in ``workflow/scripts/`` call.
"""

__version__ = "0.1.0"
