"""Ablations: the grid of runs, running it, and what each factor is worth."""
