"""The border with the compiled extension `_C`: loading it, dtype codes, checks, threads."""
