"""What every exact engine shares, below the engines themselves: the results (inertia,
status, errors), the engine contract and factorisation base, and the stable elimination
of a symmetric block with delayed pivots, which the chain sweep and the dense engine both
run (design note: docs/design/chain-curvature.md, "Stable elimination" and "The engine
contract")."""
