"""Shared test helpers, used by the tests of every op: inputs.py (random inputs in every layout,
parameters, upstream gradients, TensorCase, pytest ids), checks.py (outputs and gradients vs the
float64 reference, untouched inputs, error messages, custom-op recording + opcheck, gradcheck),
modes.py (every torch mode)."""
