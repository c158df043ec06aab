"""Curvature operators (``@``, ``to_dense``, ``to_scipy``) and the functional API over them."""
