"""Solves, log-determinants, eigenvalue counts and Newton steps for curvature matrices."""
