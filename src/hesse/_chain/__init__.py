"""The chain solver: stages, their stable elimination, the sweep and its factorisation
(design note: docs/design/chain-curvature.md)."""
