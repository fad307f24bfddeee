"""Mask proposers for the segment stage: SAM2 (production) and a weight-free classical one."""
