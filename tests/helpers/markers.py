"""Markers shared by the tests of several areas."""

import pytest

from mabn.data import fashion_mnist

needs_debian = pytest.mark.skipif(
    not fashion_mnist.DEBIAN_DIR.is_dir(), reason="needs `apt-get install dataset-fashion-mnist`"
)
