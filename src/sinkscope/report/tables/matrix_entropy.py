"""Matrix entropy of the residual stream."""
