"""agelab: an experiment-tracking ablation suite for deep age regression."""

__version__ = "0.1.0"
