"""first_k_true: a hand case and nonzero()[:k] on random masks."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instseg_edu.ops.indexing import first_k_true


def test_first_k_true_hand_case():
    mask = torch.tensor([False, True, True, False, True])
    assert first_k_true(mask, 2).tolist() == [1, 2]
    assert first_k_true(mask, 3).tolist() == [1, 2, 4]
    assert first_k_true(mask, 0).tolist() == []
    # past the True entries: the False ones follow, in order
    assert first_k_true(mask, 5).tolist() == [1, 2, 4, 0, 3]
    assert first_k_true(mask, 2).dtype == torch.int64


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=0, max_size=300), st.integers(0, 300))
def test_first_k_true_equals_nonzero_prefix(values, k):
    mask = torch.tensor(values, dtype=torch.bool)
    k = min(k, int(mask.sum()))
    assert torch.equal(first_k_true(mask, k), mask.nonzero()[:k, 0])
