"""The HLO reader behind `jaxformer compile`, on hand-written modules whose counts are worked
out by hand here: loops at their trip counts, dot FLOPs, collective wire bytes, HBM traffic."""

from __future__ import annotations

import re

import pytest

from jaxformer.aot import hlo

# A loop of 12 iterations (the condition compares the counter with 12) whose body multiplies
# [8, 64] x [64, 32] and all-gathers a [4, 32] f32 shard over groups of 4; the entry
# all-reduces a bf16 [1024] over 8 devices, once. A fusion body holds a dot that must not
# count as traffic. One instruction spreads over two lines, as a kernel's config does.
MODULE = """HloModule test, entry_computation_layout={()->f32[]}

%fused_add (p0: f32[8,32], p1: f32[8,32]) -> f32[8,32] {
  %p0 = f32[8,32]{1,0} parameter(0)
  %p1 = f32[8,32]{1,0} parameter(1)
  ROOT %add.1 = f32[8,32]{1,0} add(%p0, %p1)
}

%cond (c: (s32[], f32[8,64], f32[64,32])) -> pred[] {
  %c = (s32[], f32[8,64]{1,0}, f32[64,32]{1,0}) parameter(0)
  %limit = s32[] constant(12)
  %i = s32[] get-tuple-element(%c), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (b: (s32[], f32[8,64], f32[64,32])) -> (s32[], f32[8,64], f32[64,32]) {
  %b = (s32[], f32[8,64]{1,0}, f32[64,32]{1,0}) parameter(0)
  %x = f32[8,64]{1,0} get-tuple-element(%b), index=1
  %w = f32[64,32]{1,0} get-tuple-element(%b), index=2
  %shard = f32[4,32]{1,0} get-tuple-element(%b), index=3
  %d = f32[8,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g = f32[16,32]{1,0} all-gather(f32[4,32]{1,0} %shard), replica_groups={{0,1,2,3},{4,5,6,7}},
dimensions={0}, custom={"a":
"multi-line"}
  %s = f32[8,32]{1,0} fusion(%d, %d), kind=kLoop, calls=%fused_add
  ROOT %t = (s32[], f32[8,64]{1,0}, f32[64,32]{1,0}) tuple(%i2, %x, %w)
}

ENTRY %main (a: bf16[1024]) -> bf16[1024] {
  %a = bf16[1024]{0} parameter(0)
  %init = (s32[], f32[8,64]{1,0}, f32[64,32]{1,0}) tuple(%z, %x0, %w0)
  %loop = (s32[], f32[8,64]{1,0}, f32[64,32]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = bf16[1024]{0} all-reduce(%a), replica_groups=[1,8]<=[8], to_apply=%sum
}
"""


def test_loops_count_at_their_trip_count():
    comps = hlo.parse_module(MODULE)
    assert [c.name for c in comps] == ["fused_add", "cond", "body", "main"]
    mult, unknown = hlo.multipliers(comps)
    assert unknown == []
    assert mult["main"] == 1 and mult["body"] == 12 and mult["fused_add"] == 12


def test_known_trip_count_wins_over_the_condition():
    text = MODULE.replace("body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"5"}}')
    mult, _ = hlo.multipliers(hlo.parse_module(text))
    assert mult["body"] == 5


def test_dot_flops_times_trip_count():
    flops, unknown = hlo.dot_flops(MODULE)
    assert flops == 12 * 2 * 8 * 32 * 64 and unknown == []


def test_unoptimized_text_without_percent_signs():
    text = MODULE.replace("%", "")
    assert hlo.dot_flops(text)[0] == 12 * 2 * 8 * 32 * 64
    # JAX's text of the unoptimized program heads computations with their name alone
    bare = re.sub(r"^(ENTRY )?(\w+) \(.*\{$", r"\1\2 {", text, flags=re.M)
    assert "body {" in bare and "ENTRY main {" in bare
    assert hlo.dot_flops(bare)[0] == 12 * 2 * 8 * 32 * 64


def test_collective_wire_bytes():
    got = hlo.collective_bytes(MODULE, n_devices=8)
    # all-gather: output 16*32*4 bytes, group of 4 -> 3/4 of it, 12 times
    assert got["all-gather"] == pytest.approx(12 * 16 * 32 * 4 * 3 / 4)
    # all-reduce (ring): 2 * 1024 * 2 bytes * 7/8, once
    assert got["all-reduce"] == pytest.approx(2 * 1024 * 2 * 7 / 8)
    assert got["reduce-scatter"] == got["all-to-all"] == got["collective-permute"] == 0


@pytest.mark.parametrize("groups,size", [
    ("replica_groups={{0,1}}", 2), ("replica_groups=[4,2]<=[8]", 2),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", 4),
    ("replica_groups=mesh['x'=2,'y'=2,'z'=2] {'x','z'}", 4), ("channel_id=1", 8)])
def test_group_size_formats(groups, size):
    assert hlo._group_size(groups, 8) == size


def test_hbm_traffic_counts_run_instructions_not_fusion_bodies():
    # per body iteration: dot 8*32*4 out + 8*64*4 + 64*32*4 in; all-gather 16*32*4 out +
    # 4*32*4 in; fusion 8*32*4 out + 2 * 8*32*4 in; the condition's compare: a pred out,
    # two s32 in. Entry: all-reduce 2 * 2048.
    body = (8 * 32 + 8 * 64 + 64 * 32) * 4 + (16 * 32 + 4 * 32) * 4 + 3 * 8 * 32 * 4
    cond = 1 + 4 + 4
    assert hlo.hbm_bytes(MODULE) == 12 * (body + cond) + 2 * 2048


def test_shape_bytes():
    assert hlo.shape_bytes("bf16[4,48,192]{2,1,0:T(8,128)(2,1)}") == 4 * 48 * 192 * 2
    assert hlo.shape_bytes("(f32[2], s8[3], pred[])") == 8 + 3 + 1


def test_hbm_shape_bytes_leaves_out_on_chip_memory_spaces():
    assert hlo.hbm_shape_bytes("bf16[4,48]{1,0:T(8,128)(2,1)}") == 4 * 48 * 2
    assert hlo.hbm_shape_bytes("bf16[4,48]{1,0:T(8,128)(2,1)S(1)}") == 0  # VMEM
    assert hlo.hbm_shape_bytes("(f32[8]{0}, f32[8]{0:S(1)}, u32[]{:S(2)})") == 32


# XLA's memory space assignment on a TPU: a prefetch of a weight into VMEM (copy-start into
# S(1)), an async slice of one layer out of a stacked HBM buffer into VMEM, and a fusion that
# reads both on chip and writes its result to HBM.
PREFETCH = """
HloModule m, entry_computation_layout={()->f32[8,128]{1,0}}

%fused (p0: f32[8,128], p1: f32[8,128]) -> f32[8,128] {
  %p0 = f32[8,128]{1,0:S(1)} parameter(0)
  %p1 = f32[8,128]{1,0:S(1)} parameter(1)
  ROOT %add = f32[8,128]{1,0} add(f32[8,128]{1,0:S(1)} %p0, f32[8,128]{1,0:S(1)} %p1)
}

ENTRY %main (w: f32[8,128], stack: f32[4,8,128], i: s32[]) -> f32[8,128] {
  %w = f32[8,128]{1,0} parameter(0)
  %stack = f32[4,8,128]{2,1,0} parameter(1)
  %i = s32[]{:S(2)} parameter(2)
  %cs = (f32[8,128]{1,0:S(1)}, f32[8,128]{1,0}, u32[]{:S(2)}) copy-start(f32[8,128]{1,0} %w)
  %cd = f32[8,128]{1,0:S(1)} copy-done(%cs)
  %ss = ((f32[4,8,128]{2,1,0}), f32[8,128]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%stack, %i)
  %sd = f32[8,128]{1,0:S(1)} slice-done(%ss)
  ROOT %f = f32[8,128]{1,0} fusion(%cd, %sd), kind=kLoop, calls=%fused
}
"""


def test_prefetched_and_sliced_operands_are_read_from_hbm_once():
    tile = 8 * 128 * 4
    # the prefetch reads w; the async slice reads one of the 4 layers; the fusion writes its
    # output (its two operands are in VMEM)
    assert hlo.hbm_bytes(PREFETCH) == tile + tile + tile
