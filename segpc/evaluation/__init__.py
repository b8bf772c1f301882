"""Judging results: the official and strict metrics, rule comparisons, the report."""
