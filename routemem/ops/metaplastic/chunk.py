"""Placeholder: the chunked form is being written (helper); falls back to the reference."""

from routemem.ops.metaplastic.reference import metaplastic_reference


def metaplastic_chunk(q, k, v, beta, log_alpha, i_prior, scale, initial_state, with_uncertainty,
                      chunk_size):
    return metaplastic_reference(q, k, v, beta, log_alpha, i_prior, scale, initial_state,
                                 with_uncertainty)
