"""Evaluation: stage-1 answer accuracy from the compression states (`compression`)."""
