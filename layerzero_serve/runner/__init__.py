"""Model runner: inputs from a schedule, the attention interface, forward and sampling."""
