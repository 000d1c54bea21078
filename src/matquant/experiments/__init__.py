"""Experiment grids: run, store (JSONL), skip what is done, tabulate and plot."""
