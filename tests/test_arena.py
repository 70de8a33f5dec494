"""quant/arena.py: a model's quantized matrices moved into one huge-page block, values unchanged."""

from __future__ import annotations

import torch
from torch import nn

from sugam.quant.arena import HUGE_PAGE, gather_quantized_weights, huge_page_buffer
from sugam.quant.formats import quantize_int8
from sugam.quant.linear import QuantizedLinear


def test_huge_page_buffer_starts_on_a_2mb_boundary():
    block = huge_page_buffer(3 * HUGE_PAGE + 5)
    assert block.numel() == 3 * HUGE_PAGE + 5 and block.data_ptr() % HUGE_PAGE == 0


def test_quantized_matrices_move_into_one_block_and_compute_the_same():
    torch.manual_seed(0)
    model = nn.Sequential(*[QuantizedLinear(quantize_int8(torch.randn(512, 1024)), torch.randn(512))
                            for _ in range(4)])
    x = torch.randn(3, 1024)
    before = [m(x) for m in model]
    moved = gather_quantized_weights(model, QuantizedLinear)
    buffers = [b for m in model for b in m.buffers()]
    assert moved >= sum(b.numel() * b.element_size() for b in buffers)
    start = min(b.data_ptr() for b in buffers)
    assert start % HUGE_PAGE == 0  # the block's first matrix
    assert max(b.data_ptr() + b.numel() * b.element_size() for b in buffers) - start <= moved
    assert all(b.data_ptr() % 64 == 0 for b in buffers)
    assert all(torch.equal(a, m(x)) for a, m in zip(before, model))


def test_small_models_are_left_where_they_are():
    layer = QuantizedLinear(quantize_int8(torch.randn(64, 64)))
    ptr = layer.q.data_ptr()
    assert gather_quantized_weights(layer, QuantizedLinear) == 0 and layer.q.data_ptr() == ptr
