"""csrc/cpu/weight_memory.cpp: the kernels' prepared weights live in chunks advised for transparent huge pages,
small ones side by side in the order they are prepared; the weight-only op's cached copy is exact, one per
weight, dies with it and follows in-place writes."""
import gc
import os
import sys

import pytest
import torch

import glufx  # noqa: F401  (registers torch.ops.glufx)
from glufx.ops import NATIVE, prepared_weights, reference

ops = torch.ops.glufx
PER_TOKEN = 1
pytestmark = pytest.mark.skipif(not NATIVE, reason="the reference library prepares nothing")
THP = sys.platform == "linux" and os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds `address` (proc(5))."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not THP, reason="transparent huge pages: Linux with THP only")
@pytest.mark.parametrize("shape", [(48, 40), (4096, 1024)])  # a chunk-shared weight, one of its own
def test_packed_weight_is_advised_for_huge_pages(shape):
    packed = ops.pack_weight(torch.randint(-127, 128, shape, dtype=torch.int8))
    assert packed.data_ptr() % 64 == 0
    assert "hg" in _vm_flags(packed.data_ptr())
    assert "hg" in _vm_flags(packed.data_ptr() + packed.numel() - 1)


def test_small_weights_are_packed_side_by_side_in_order():
    """A decode step then reads its weights as one nearly sequential stream."""
    first = ops.pack_weight(torch.randint(-127, 128, (32, 64), dtype=torch.int8))  # 2 KiB
    second = ops.pack_weight(torch.randint(-127, 128, (16, 40), dtype=torch.int8))
    if second.data_ptr() != first.data_ptr() + first.numel():  # the first filled its chunk's last bytes
        third = ops.pack_weight(torch.randint(-127, 128, (16, 40), dtype=torch.int8))
        assert third.data_ptr() == second.data_ptr() + second.numel()


def test_packed_weight_round_trips_and_outlives_nothing():
    w_q = torch.randint(-127, 128, (100, 72), dtype=torch.int8)
    packed = ops.pack_weight(w_q)
    assert torch.equal(ops.unpack_weight(packed, 100, 72), w_q)
    view = packed[1:]  # a view keeps its chunk alive after the packed tensor is gone
    expected = packed[1:].clone()
    del packed
    gc.collect()
    ops.pack_weight(torch.randint(-127, 128, (4096, 1024), dtype=torch.int8))  # reuses freed memory, if any
    assert torch.equal(view, expected)


@pytest.mark.parametrize("rows", [1, 3])  # the weight-streaming loop, which reads the copy
def test_weight_only_copy_is_made_once_dies_with_its_weight_and_follows_writes(rows):
    g = torch.Generator().manual_seed(rows)
    w_q, w_s = ops.quantize_weight(torch.randn(40, 72, generator=g))
    x = torch.randn(rows, 72, generator=g)
    gc.collect()
    before = prepared_weights()
    y = ops.int8_weight_linear(x, w_q, w_s, None)
    assert torch.equal(y, ops.int8_weight_linear(x, w_q, w_s, None))
    assert prepared_weights() == before + 1
    torch.testing.assert_close(y, reference.int8_weight_linear(x, w_q, w_s, None))
    w_q[5].neg_()  # a stale copy would silently compute with the old weight
    torch.testing.assert_close(ops.int8_weight_linear(x, w_q, w_s, None), reference.int8_weight_linear(x, w_q, w_s, None))
    assert prepared_weights() == before + 1
    del w_q
    gc.collect()
    assert prepared_weights() == before


def test_weight_only_and_int8_linear_keep_separate_forms_of_one_weight():
    """The same w_q feeds a weight-only copy and a packed form; neither may be served for the other."""
    g = torch.Generator().manual_seed(7)
    w_q, w_s = ops.quantize_weight(torch.randn(48, 64, generator=g))
    x = torch.randn(2, 64, generator=g)
    gc.collect()
    before = prepared_weights()
    for _ in range(2):
        torch.testing.assert_close(ops.int8_weight_linear(x, w_q, w_s, None),
                                   reference.int8_weight_linear(x, w_q, w_s, None))
        assert torch.equal(ops.int8_linear(x, w_q, w_s, None, None, PER_TOKEN),
                           reference.int8_linear(x, w_q, w_s, None, None, PER_TOKEN))
    assert prepared_weights() == before + 2
