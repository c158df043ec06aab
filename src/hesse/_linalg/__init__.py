"""The exact engines (dense, observation space) and the choice among them with the chain
(`factorize`, `plan`), and what is built on them: solves, counts, certified eigenvalues."""
