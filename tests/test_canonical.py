"""Canonical structure: the widened graph equals, op for op and shape for shape, what the exporter
itself produces for the wide config (skeletons of native wide exports in sample_models/)."""
import pytest

from onnx_widen import widen
from onnx_widen.structure import differences

from conftest import SUPPORTED as NAMES, load_sample, load_wide_skeleton


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_structure_equals_native_wide_export(name, k):
    wide = widen(load_sample(name), factor=k)
    assert differences(wide, load_wide_skeleton(name, k)) == {}


def test_orthogonal_scheme_is_not_canonical_in_epsilon():
    """The post's weights need eps/k: the comparison must see that (it can fail)."""
    wide = widen(load_sample("bert_ts17"), factor=2, residual="orthogonal")
    diff = differences(wide, load_wide_skeleton("bert_ts17", 2))
    assert set(diff) == {"attributes"}


def test_small_model_is_not_the_wide_structure():
    diff = differences(load_sample("bert_dyn18"), load_wide_skeleton("bert_dyn18", 2))
    assert "initializer_shapes" in diff and "int_constants" in diff
