"""Tests of the broker-managed sources (broker/sources). A package, so that its conftest is not
the module `conftest` that other tests import from."""
