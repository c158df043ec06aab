"""Autodiff over a `Problem`: the problem itself (flattening, batching, reduction), the
loss module (dispatch and output-space curvature), matrix-free products, Bishop's exact
MLP Hessian and derivative checks."""
