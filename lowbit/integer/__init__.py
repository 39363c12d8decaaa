"""lowbit.integer: integer-only inference (BN folding, fixed-point requantization, I-BERT operators)."""
