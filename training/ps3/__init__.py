"""PS3 pre-training: model (``model``), losses, data and the Ray Train launcher (``train``)."""
