"""Judging the models: perplexity and bits per byte (metrics.py), scoring any model on a token
stream or a text (scoring.py), the figures (plots.py) and the report card (report.py)."""
