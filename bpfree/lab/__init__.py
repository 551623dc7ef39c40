"""Studying rules side by side: `compare` runs, results tables and plots, gradient quality, the rule x model
matrix."""
