"""The authors' code for the comparisons, from a checkout outside this repository named by an
environment variable; the test is skipped, saying which variable, where it is not given."""

import os

import pytest
from external_code import load_module


def authors_module(variable: str, file_in_checkout: str):
    source = os.environ.get(variable)
    if not source:
        pytest.skip(f"the authors' code is not given ({variable}=<their checkout>/{file_in_checkout})")
    return load_module(source, f"authors_{variable.lower()}")
