"""lcnn: a reproducible hyperparameter study of lightweight timm image classifiers.

The package is split by workflow stage (data, models, train, benchmark, report) and never imports
snakemake, so every stage can be run and tested on its own with ``python -m lcnn.<stage>``.
"""

__version__ = "0.1.0"
