"""Matching helpers shared by the passes: graph utilities, collectives, GEMM kinds, norms."""
