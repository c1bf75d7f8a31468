"""Collective bytes of a real Flax/optax shard_map training step, from HLO."""

import math

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import optax
import pytest

import gqsgd_jax
from gqsgd_jax._src import hlo
from gqsgd_jax._src import wire

from _utils import data_mesh

_WORKERS = 8


class _Mlp(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, 256, rngs=rngs)
    self.out = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def _compiled_step(compressor, *, use_varying=True):
  """Compiles one data-parallel training step; returns (compiled, #grads)."""
  graphdef, params = nnx.split(_Mlp(nnx.Rngs(0)), nnx.Param)
  tx = optax.chain(compressor, optax.sgd(0.1))
  opt_state = tx.init(params)
  mesh = data_mesh(_WORKERS)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  @jax.shard_map(
    mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
  )
  def step(params, opt_state, x, y):
    local = gqsgd_jax.varying(params, "data") if use_varying else params
    grads = jax.grad(loss_fn)(local, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  x = jnp.zeros((_WORKERS * 4, 64))
  y = jnp.zeros((_WORKERS * 4,), jnp.int32)
  compiled = step.lower(params, opt_state, x, y).compile()
  n = sum(leaf.size for leaf in jax.tree.leaves(params))
  return compiled, n


@pytest.mark.parametrize("bits", [8, 6, 5])
def test_psum_payload_is_bits_per_gradient_element(bits):
  compiled, n = _compiled_step(
    gqsgd_jax.global_quantize(bits=bits, reduction="psum")
  )
  report = gqsgd_jax.wire_report(compiled)
  assert report.float_payload_bytes == 0  # no hidden f32 all-reduce
  expected = (
    wire.num_words(n, bits, bits == 8)
    * wire.word_dtype(bits, bits == 8).itemsize
  )
  assert set(report.by_op) == {"all-reduce"}  # the pmax and the int psum
  assert expected <= report.payload_bytes <= expected * 1.01
  # uint32 words carry floor(32/bits) lanes: bits/8 per element plus the
  # unused bits of each word (6-bit: 5 lanes = 30 of 32 bits).
  assert (
    report.payload_bytes
    <= n * wire.wire_bits_per_element(bits, bits == 8) / 8 * 1.01 + 4
  )
  # The only float collective is the single pmax of the scales.
  scales = [c for c in report.collectives if c.kind == "scale"]
  assert len(scales) == 1 and scales[0].dtype == "f32"
  assert report.scale_bytes == scales[0].bytes


@pytest.mark.parametrize("bits", [4, 8])
def test_butterfly_payload_is_bits_per_element_each_way(bits):
  compiled, n = _compiled_step(
    gqsgd_jax.global_quantize(bits=bits, reduction="butterfly")
  )
  report = gqsgd_jax.wire_report(compiled)
  assert report.float_payload_bytes == 0
  words = wire.num_words(n, bits) * wire.word_dtype(bits).itemsize
  # Reduce-scatter: (W-1)/W of the buffer over ppermute; all-gather: the
  # buffer (W blocks of 1/W, the device's own block included).
  sent = report.by_op["collective-permute"]
  gathered = report.by_op["all-gather"]
  scatter = words * (_WORKERS - 1) / _WORKERS
  assert scatter <= sent <= scatter * 1.01 + _WORKERS
  assert words <= gathered <= words * 1.01 + _WORKERS


def test_f32_baseline_and_hidden_psum_are_detected():
  compiled, n = _compiled_step(gqsgd_jax.psum_mean())
  report = gqsgd_jax.wire_report(compiled)
  # All f32 payload, the 10-element bias included: no size threshold.
  assert report.float_payload_bytes == report.total_bytes == 4 * n
  assert report.scale_bytes == 0
  # Without varying(), jax.grad all-reduces the f32 gradients itself: the
  # compressor then sits on top of an uncompressed all-reduce.
  hidden, n = _compiled_step(
    gqsgd_jax.global_quantize(bits=8), use_varying=False
  )
  report = gqsgd_jax.wire_report(hidden)
  assert report.float_payload_bytes >= 4 * n


def test_hlo_parser_counts_shapes_and_async_pairs():
  text = "\n".join(
    [
      "%sum.1 (p.0: s32[], p.1: s32[]) -> s32[] {",
      "  ROOT %add.2 = s32[] add(s32[] %p.0, s32[] %p.1)",
      "}",
      "%max.3 (p.0: f32[], p.1: f32[]) -> f32[] {",
      "  ROOT %maximum.4 = f32[] maximum(f32[] %p.0, f32[] %p.1)",
      "}",
      "  %a = s8[1000]{0} all-reduce(s8[1000]{0} %x), replica_groups={},"
      " to_apply=%sum.1",
      "  %b = (f32[3]{0}, u32[10]{0}) all-reduce(%y, %z), to_apply=%max.3",
      "  %c = (u8[64]{0}, u8[64]{0}, u32[], u32[]) collective-permute-start(",
      "  %d = u8[64]{0} collective-permute-done(%c)",
      "  %e = u8[8,16]{1,0} all-gather(u8[1,16]{1,0} %w), dimensions={0}",
    ]
  )
  found = hlo.collectives(text)
  assert [(c.op, c.dtype, c.elements) for c in found] == [
    ("all-reduce", "s8", 1000),
    ("all-reduce", "f32", 3),
    ("all-reduce", "u32", 10),
    ("collective-permute", "u8", 64),
    ("all-gather", "u8", 128),
  ]
  assert [c.reducer for c in found] == ["sum", "max", "max", None, None]
  report = gqsgd_jax.wire_report(text, num_devices=8)
  # Split by role, not size: the max all-reduce is scales, the rest payload.
  assert report.payload_bytes == 1000 + 64 + 128
  assert report.scale_bytes == 12 + 40
  assert len(report.collectives) == 5
  assert math.isclose(report.total_bytes, 1000 + 64 + 128 + 52)
  # Ring all-reduce 2(G-1)/G, permute all, all-gather (G-1)/G of the result.
  assert math.isclose(
    report.sent_bytes, 2 * 7 / 8 * (1000 + 52) + 64 + 7 / 8 * 128
  )
  # Newer XLA states groups as mesh axes.
  mesh_line = (
    "  %p = f32[100]{0} all-reduce(%x), channel_id=1, "
    "replica_groups=mesh['data'=4, 'model'=2] {'data'}, "
    "to_apply=%sum"
  )
  assert hlo.collectives(mesh_line)[0].group_size == 4
  # Without a stated group size, sent bytes are unknown, not guessed.
  assert math.isnan(gqsgd_jax.wire_report(text).sent_bytes)


def test_sent_bytes_compare_methods_on_equal_terms():
  # Per element sent: f32 ring all-reduce 2 * 7/8 * 4 = 7 bytes; 4-bit
  # butterfly 7/8 * 0.5 (reduce-scatter) + 7/8 * 0.5 (all-gather).
  f32, n = _compiled_step(gqsgd_jax.psum_mean())
  gq4, _ = _compiled_step(gqsgd_jax.global_quantize(bits=4))
  sent_f32 = gqsgd_jax.wire_report(f32).sent_bytes
  report = gqsgd_jax.wire_report(gq4)
  sent_gq4 = report.sent_bytes
  # The scales' pmax, whatever their number, on top of the codes.
  scales = sum(c.sent_bytes() for c in report.collectives if c.kind == "scale")
  assert math.isclose(sent_f32, 7 * n, rel_tol=1e-6)
  assert 0.875 * n <= sent_gq4 - scales <= 0.875 * n * 1.01 + 64
  assert sent_f32 / sent_gq4 > 7.5


def test_reduce_scatter_sent_bytes_count_the_input_share():
  # The HLO names the reduce-scatter's result (1/G of the input); each of
  # the G devices sends (G-1)/G of its input: G-1 result-sized blocks.
  mesh = data_mesh(4)

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P("data"), out_specs=P("data"))
  def scatter(x):
    return jax.lax.psum_scatter(x[0], "data", tiled=True)[None]

  text = scatter.lower(jnp.ones((4, 1024))).compile().as_text()
  (rs,) = [c for c in hlo.collectives(text) if c.op == "reduce-scatter"]
  assert rs.bytes == 256 * 4
  assert rs.sent_bytes(4) == 3 / 4 * 1024 * 4
