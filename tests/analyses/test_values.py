"""Value heads per query head, against Hugging Face's own grouped-query expansion."""

import pytest
import torch
from transformers.models.llama.modeling_llama import repeat_kv

from rope_leak.analyses.values import values_per_query_head


def test_matches_hugging_face_repeat_kv():
    v = torch.randn(2, 5, 3, 4)  # [batch, pos, kv_head, d_head]
    expected = repeat_kv(v.transpose(1, 2), 4).transpose(1, 2)  # HF works on [batch, kv_head, pos, d]
    assert torch.equal(values_per_query_head(v, 12), expected)


def test_no_grouping_is_a_no_op_and_uneven_groups_are_refused():
    v = torch.randn(1, 3, 6, 2)
    assert values_per_query_head(v, 6) is v
    with pytest.raises(ValueError, match="cannot share"):
        values_per_query_head(v, 8)
