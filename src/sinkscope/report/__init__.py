"""Outputs: run directories, figures, terminal tables."""
