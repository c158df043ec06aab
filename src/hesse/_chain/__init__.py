"""The chain solver: stages, the sweep and its factorisation (design note:
docs/design/chain-curvature.md). The stable elimination it runs at every stage lives in
`hesse._factor.elimination`."""
