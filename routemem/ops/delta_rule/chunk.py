"""Placeholder: the chunked form is being written (helper); falls back to the reference."""

from routemem.ops.delta_rule.reference import delta_rule_reference


def delta_rule_chunk(q, k, v, beta, log_alpha, scale, initial_state, chunk_size):
    return delta_rule_reference(q, k, v, beta, log_alpha, scale, initial_state)
