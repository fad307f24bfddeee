"""Captioning parts: prompt templates, caption hygiene and the MLLM backends behind one interface."""
