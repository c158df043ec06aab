"""Spectra of curvature operators: Lanczos, stochastic trace and density estimates."""
