"""Shared fixtures: the tiny random Flux stack, written once per test session in the users' file layouts."""
import pytest

from trainer_core.tiny import TinyFluxPaths, write_tiny_flux


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> TinyFluxPaths:
    return write_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))
