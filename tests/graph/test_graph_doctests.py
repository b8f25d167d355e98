"""The docstring examples of the graph modules run and give the values they show."""

import doctest
import importlib

import pytest

MODULES = ["config", "augment", "encoder", "losses", "probe", "ssl", "clean", "datasets", "experiment", "sampling",
           "anomaly", "tune", "dynamic"]


@pytest.mark.parametrize("name", [f"autoglm.graph.{m}" for m in MODULES] + ["autoglm.recipes.graph_ssl"])
def test_doctests(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod)
    assert res.attempted > 0 and res.failed == 0
