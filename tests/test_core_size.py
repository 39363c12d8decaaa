"""The size accountant against hand-computed byte counts."""

import pytest
import torch

from lowbit.core import pack, per_channel, per_group, per_tensor, size_of


def test_int4_g128_symmetric_fp16_scales():
    r = size_of((4096, 4096), "int4", per_group(128), symmetric=True, scale_dtype=torch.float16)
    assert r.code_bytes == 4096 * 4096 // 2  # 8,388,608
    assert r.scale_bytes == 4096 * 32 * 2  # 262,144
    assert r.zero_point_bytes == 0
    assert r.total_bytes == 8_650_752
    assert r.bits_per_weight == pytest.approx(4.125)


def test_more_groups_more_overhead():
    bpw = [size_of((256, 1024), "int4", per_group(g), False).bits_per_weight for g in (128, 64, 32)]
    # affine: 4 bits + 16/g scale + 4/g zero-point
    assert bpw == pytest.approx([4 + 20 / 128, 4 + 20 / 64, 4 + 20 / 32])


def test_int3_packing_bytes():
    r = size_of((10, 10), "int3", per_tensor(), True, torch.float32)
    assert r.code_bytes == 13 * 3  # ceil(100 / 8) runs of 3 bytes
    assert r.scale_bytes == 4
    assert r.code_bytes == pack(torch.zeros(100, dtype=torch.uint8), 3).numel()


def test_int8_per_channel_fp32():
    r = size_of((384, 1536), "int8", per_channel(0), True, torch.float32)
    assert r.total_bytes == 384 * 1536 + 384 * 4


def test_fp16_cast_and_binary():
    assert size_of((100,), "fp16").total_bytes == 200
    r = size_of((64, 64), "binary", per_channel(0), True, torch.float16)
    assert r.total_bytes == 64 * 64 // 8 + 64 * 2
    assert r.ratio_vs_fp32 == pytest.approx(4 * 4096 / r.total_bytes)
