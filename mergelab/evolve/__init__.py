"""Evolutionary merge search: job schema, genome <-> recipe, in-memory merging of candidates."""
