"""What exact curvature is for: the Laplace approximation and influence functions, built
on the exact engines (`hesse._linalg`)."""
