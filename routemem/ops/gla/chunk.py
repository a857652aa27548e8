"""Placeholder: the chunked form is being written (helper); falls back to the reference."""

from routemem.ops.gla.reference import gla_reference


def gla_chunk(q, k, v, log_alpha, scale, initial_state, chunk_size):
    return gla_reference(q, k, v, log_alpha, scale, initial_state)
