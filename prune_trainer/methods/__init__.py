"""Pruning methods' math: importance scores and weight updates (Trainer-independent)."""
