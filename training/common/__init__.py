"""What both training jobs share: the base recipe, the Ray Train launcher and the skipped-row counts."""
