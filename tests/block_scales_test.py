"""Block-wise global scales: kernels, statistics, overflow, NaN, wire bytes."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import gqsgd_jax
from gqsgd_jax._src import global_quantize as gq
from gqsgd_jax._src import ops
from gqsgd_jax._src import scales
from gqsgd_jax._src import wire

from _utils import assert_replicas_equal
from _utils import assert_trees_bitwise_equal
from _utils import data_mesh
from _utils import monte_carlo_estimates
from _utils import sharded_update

_HAS_FFI = gqsgd_jax.HAS_CPU
_SEED = jnp.array([0x1234, 0xBEEF], jnp.uint32)
needs_ffi = pytest.mark.skipif(not _HAS_FFI, reason="CPU FFI not built")


def _bits_of(x):
  x = np.asarray(x)
  return x.reshape(-1).view(np.uint8)


def _block_scales(n, block_size, seed=0):
  # Scales spread over 2^-30..2^30, so a wrong block index shows.
  rng = np.random.default_rng(seed)
  blocks = ops.num_scale_blocks(n, block_size)
  return jnp.asarray(
    2.0 ** rng.integers(-30, 30, blocks) * rng.uniform(0.5, 1.0, blocks),
    jnp.float32,
  )


_SIZES = [0, 1, 31, 33, 257, 1000]


@needs_ffi
@pytest.mark.parametrize("block_size", [32, 256])
@pytest.mark.parametrize(
  "bits,signed", [(8, True), (4, False), (3, False), (8, False)]
)
def test_quantize_dequantize_ffi_matches_twin(block_size, bits, signed):
  levels = 15 if signed else wire.max_levels(bits)
  offset = 0 if signed else levels
  for n in _SIZES:
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
      x = jax.random.normal(jax.random.PRNGKey(n), (n,)).astype(dtype)
      scale = _block_scales(n, block_size, n)
      # x * scale is far outside [-levels, levels] for most blocks: the clamp
      # is exercised as well as the rounding.
      x = (x / jnp.repeat(scale, block_size)[:n].astype(dtype)).astype(dtype)
      q = functools.partial(
        ops.quantize,
        levels=levels,
        bits=bits,
        signed_codes=signed,
        block_size=block_size,
      )
      a = jax.jit(functools.partial(q, impl="ffi"))(x, scale, _SEED)
      b = jax.jit(functools.partial(q, impl="xla"))(x, scale, _SEED)
      np.testing.assert_array_equal(_bits_of(a), _bits_of(b))
      d = functools.partial(
        ops.dequantize,
        n=n,
        bits=bits,
        offset=offset,
        signed_codes=signed,
        block_size=block_size,
      )
      da = jax.jit(functools.partial(d, impl="ffi"))(a, scale)
      db = jax.jit(functools.partial(d, impl="xla"))(a, scale)
      np.testing.assert_array_equal(_bits_of(da), _bits_of(db))


@needs_ffi
@pytest.mark.parametrize("block_size", [64, 1024])
def test_large_odd_buffer_ffi_matches_twin(block_size):
  # 2^20 + 1 elements: many host blocks, a partial tail block and word.
  n = 2**20 + 1
  x = jax.random.normal(jax.random.PRNGKey(1), (n,))
  scale = _block_scales(n, block_size, 1) * 0 + jnp.float32(7 / 5)
  scale = scale * jnp.linspace(0.5, 2.0, scale.shape[0], dtype=jnp.float32)
  q = functools.partial(ops.quantize, levels=7, bits=4, block_size=block_size)
  a = jax.jit(functools.partial(q, impl="ffi"))(x, scale, _SEED)
  b = jax.jit(functools.partial(q, impl="xla"))(x, scale, _SEED)
  np.testing.assert_array_equal(_bits_of(a), _bits_of(b))
  d = functools.partial(
    ops.dequantize, n=n, bits=4, offset=7, block_size=block_size
  )
  np.testing.assert_array_equal(
    _bits_of(jax.jit(functools.partial(d, impl="ffi"))(a, scale)),
    _bits_of(jax.jit(functools.partial(d, impl="xla"))(a, scale)),
  )


@needs_ffi
@pytest.mark.parametrize("block_size", [32, 256])
def test_exponential_ffi_matches_twin(block_size):
  for n in _SIZES:
    for dtype in (jnp.float32, jnp.bfloat16):
      x = jax.random.normal(jax.random.PRNGKey(n), (n,)).astype(dtype)
      scale = _block_scales(n, block_size, n) * jnp.float32(2.0**-20)
      e = functools.partial(
        ops.exp_encode, floor_code=100, block_size=block_size
      )
      a = jax.jit(functools.partial(e, impl="ffi"))(x, scale, _SEED)
      b = jax.jit(functools.partial(e, impl="xla"))(x, scale, _SEED)
      np.testing.assert_array_equal(_bits_of(a), _bits_of(b))
      d = functools.partial(ops.exp_decode, block_size=block_size)
      np.testing.assert_array_equal(
        _bits_of(jax.jit(functools.partial(d, impl="ffi"))(a, scale)),
        _bits_of(jax.jit(functools.partial(d, impl="xla"))(a, scale)),
      )


def test_block_scale_operand_is_checked():
  x = jnp.ones(100)
  with pytest.raises(ValueError, match="block_size"):
    ops.quantize(x, jnp.ones(2), _SEED, levels=7, bits=4, block_size=48)
  with pytest.raises(ValueError, match="scale must be float32\\[4\\]"):
    ops.quantize(x, jnp.ones(3), _SEED, levels=7, bits=4, block_size=32)
  with pytest.raises(ValueError, match="block_size"):
    gqsgd_jax.global_quantize(bits=4, granularity="block", block_size=100)
  with pytest.raises(ValueError, match="block_size"):
    gqsgd_jax.global_quantize(bits=4, granularity="bucket", block_size=64)
  with pytest.raises(ValueError, match="scale_format"):
    gqsgd_jax.global_quantize(bits=4, scale_format="fp8")


def _grads(num_workers, seed=0):
  """Leaves whose sizes are not multiples of the blocks, mixed dtypes."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  # Magnitudes vary by 10^4 along the dense leaf: block scales matter.
  ramp = jnp.logspace(-4, 0, 37 * 9).reshape(37, 9)
  return {
    "dense": jax.random.normal(k1, (num_workers, 37, 9)) * ramp,
    "bias": jax.random.normal(k2, (num_workers, 70)).astype(jnp.bfloat16),
    "scale": jax.random.normal(k3, (num_workers, 3)).astype(jnp.float16),
  }


_CONFIGS = [
  (3, dict(bits=4, reduction="butterfly", block_size=32, scale_format="e8m0")),
  (4, dict(bits=8, reduction="psum", block_size=64, scale_format="f32")),
  (
    5,
    dict(bits=8, dithering="exponential", block_size=32, scale_format="bf16"),
  ),
  (8, dict(bits=4, reduction="auto", block_size=128, scale_format="e8m0")),
  (2, dict(bits=6, reduction="psum", block_size=32, scale_format="bf16")),
]


@pytest.mark.parametrize(
  "num_workers,kwargs",
  _CONFIGS,
  ids=[f"W{w}-{'-'.join(map(str, k.values()))}" for w, k in _CONFIGS],
)
def test_replicas_identical_across_modes_and_impls(num_workers, kwargs):
  grads = _grads(num_workers)
  results = {}
  for impl in ["xla"] + (["ffi"] if _HAS_FFI else []):
    tx = gqsgd_jax.global_quantize(**kwargs, granularity="block", impl=impl)
    for mode in ("shard_map", "pmap"):
      per_worker, state = sharded_update(tx, grads, tx.init(None), mode=mode)
      assert_replicas_equal(per_worker)
      results[impl, mode] = (per_worker, state)
  first = results["xla", "shard_map"]
  for other in results.values():
    assert_trees_bitwise_equal(first, other)
  out = jax.tree.map(lambda x: np.asarray(x[0], np.float32), first[0])
  mean = jax.tree.map(lambda x: np.asarray(x, np.float32).mean(0), grads)
  for name in grads:
    assert out[name].dtype == np.float32 and np.all(np.isfinite(out[name]))
  # Block scales keep the small-magnitude start of the ramp: its error is
  # bounded by its own blocks' steps, not by the leaf's max.
  head = slice(0, 32)
  err = np.abs(out["dense"].reshape(-1)[head] - mean["dense"].reshape(-1)[head])
  tail_max = np.abs(np.asarray(grads["dense"])).max()
  assert err.max() < 0.01 * tail_max


@pytest.mark.parametrize(
  "reduction,bits,fmt",
  [
    ("psum", 8, "e8m0"),
    ("butterfly", 4, "e8m0"),
    ("psum", 8, "f32"),
    ("butterfly", 4, "bf16"),
  ],
)
def test_block_scales_are_unbiased(reduction, bits, fmt):
  # 4 blocks of 16 whose magnitudes differ by 10^3: each coordinate's
  # Monte-Carlo mean is within 5 standard errors of the true mean, the
  # standard error bounded from each block's own step (leaf quantization
  # <= step^2 / (4W), butterfly re-rounding < step^2 / 2, step <= 2 M_b / s
  # for the rounded-up formats).
  w, block, count = 4, 16, 3000
  mags = np.repeat(np.array([1e-3, 1.0, 3e-2, 7.0]), block)
  g = jax.random.normal(jax.random.PRNGKey(5), (w, 4 * block)) * mags
  tx = gqsgd_jax.global_quantize(
    bits=bits,
    reduction=reduction,
    granularity="block",
    block_size=block,
    scale_format=fmt,
  )
  est = monte_carlo_estimates(tx, g, count)
  g64 = np.asarray(g, np.float64)
  block_max = np.repeat(np.abs(g64).reshape(w, 4, block).max((0, 2)), block)
  if reduction == "psum":
    levels = wire.psum_levels(bits, w, bits == 8)
  else:
    levels = wire.max_levels(bits)
  step = 2 * block_max / levels
  var = step**2 * (1 / (4 * w) + (0.5 if reduction == "butterfly" else 0))
  bias = est.mean(0) - g64.mean(0)
  z = np.abs(bias) / np.sqrt(var / count)
  assert np.all(z <= 5), (z.max(), np.argmax(z))
  # The error of the small block follows its own scale.
  assert est[:, :block].std(0).max() <= 10 * step[0]


_M = [2.0**-3, 2.0**4, 1.0, 2.0**10]  # per-block max-abs, exact in e8m0


@pytest.mark.parametrize(
  "num_workers,kwargs",
  [
    (8, dict(bits=8, reduction="psum")),
    (2, dict(bits=4, reduction="psum")),
    (8, dict(bits=4, reduction="butterfly")),
    (3, dict(bits=2, reduction="butterfly")),
  ],
  ids=["W8-8-psum", "W2-4-psum", "W8-4-butterfly", "W3-2-butterfly"],
)
@pytest.mark.parametrize("fmt", ["f32", "bf16", "e8m0"])
def test_block_extremes_never_overflow(num_workers, kwargs, fmt):
  # Every worker holds ±M_b and a hair below on every coordinate of block b:
  # the largest codes, summed W times, in every block.
  block = 32
  row = np.array([1, -1, 1 - 2**-20, -(1 - 2**-20)], np.float32)
  x = np.concatenate([np.tile(row, block // 4) * m for m in _M])
  g = jnp.asarray(np.tile(x, (num_workers, 1)))
  tx = gqsgd_jax.global_quantize(
    **kwargs, granularity="block", block_size=block, scale_format=fmt
  )
  for seed in range(2):
    per_worker, _ = sharded_update(tx, g, tx.init(seed))
    out = np.asarray(per_worker[0])
    assert np.all(np.sign(out) == np.sign(x))
    np.testing.assert_allclose(np.abs(out[::4]), np.abs(x[::4]), rtol=1e-6)
    np.testing.assert_allclose(np.abs(out[1::4]), np.abs(x[1::4]), rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(bits=8, reduction="psum", scale_format="f32"),
    dict(bits=4, reduction="butterfly", scale_format="e8m0"),
    dict(bits=8, dithering="exponential", scale_format="bf16"),
  ],
  ids=["psum8-f32", "butterfly4-e8m0", "exponential-bf16"],
)
def test_zero_blocks_exact_and_nonfinite_poisons_its_bucket(kwargs):
  w, block = 4, 32
  clean = np.linspace(-1, 1, 3 * block + 5).astype(np.float32)
  clean[block : 2 * block] = 0.0  # a whole zero block between others
  # 5000 elements: XLA:CPU's max drops NaN from 4096 elements on.
  sizes = {"a_first": 70, "b_middle": 100, "c_last": 5000}
  positions = {"a_first": 0, "b_middle": 50, "c_last": 4999}
  for bad in (np.nan, np.inf):
    grads = {"clean": jnp.asarray(np.tile(clean, (w, 1)))}
    for name, n in sizes.items():
      leaf = np.ones((w, n), np.float32)
      leaf[w - 1, positions[name]] = bad  # one worker only
      grads[name] = jnp.asarray(leaf)
    # One bucket per leaf (leaves are 4-byte aligned, buckets up to 20 KiB).
    tx = gqsgd_jax.global_quantize(
      **kwargs, granularity="block", block_size=block, bucket_bytes=1
    )
    per_worker, _ = sharded_update(tx, grads, tx.init(0))
    assert_replicas_equal(per_worker)
    out = jax.tree.map(lambda x: np.asarray(x[0]), per_worker)
    for name in sizes:
      assert np.all(np.isnan(out[name])), (bad, name)
    zeros = out["clean"][block : 2 * block]
    assert (
      np.array_equal(zeros, np.zeros(block)) and not np.signbit(zeros).any()
    )
    assert np.all(np.isfinite(out["clean"]))


class _Mlp(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, 250, rngs=rngs)
    self.out = nnx.Linear(250, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def _compiled_step(compressor, workers=8):
  graphdef, params = nnx.split(_Mlp(nnx.Rngs(0)), nnx.Param)
  tx = optax.chain(compressor, optax.sgd(0.1))
  opt_state = tx.init(params)
  mesh = data_mesh(workers)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  @jax.shard_map(
    mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
  )
  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(gqsgd_jax.varying(params, "data"), x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  x = jnp.zeros((workers * 4, 64))
  y = jnp.zeros((workers * 4,), jnp.int32)
  n = sum(leaf.size for leaf in jax.tree.leaves(params))
  return step.lower(params, opt_state, x, y).compile(), n


@pytest.mark.parametrize("bits", [4, 8])
def test_default_wire_bytes_and_only_scales_are_float(bits):
  compiled, n = _compiled_step(gqsgd_jax.global_quantize(bits=bits))
  report = gqsgd_jax.wire_report(compiled)
  assert report.float_payload_bytes == 0  # the gradient never travels as f32
  scales = [c for c in report.collectives if c.kind == "scale"]
  assert len(scales) == 1  # one max-reduction for all blocks of all buckets
  config = gq.default_config(bits)
  fmt = config["scale_format"]
  assert scales[0].dtype == {"f32": "f32", "bf16": "u16", "e8m0": "u8"}[fmt]
  if config["granularity"] == "block":
    assert scales[0].elements == -(-n // config["block_size"])
  floats = [c for c in report.collectives if c.dtype.startswith(("f", "bf"))]
  assert floats == ([scales[0]] if fmt == "f32" else [])
  # Payload + scales, as bytes each device sends: at least 0.97 x 32/bits
  # fewer than the f32 all-reduce's 2 (W-1)/W 4n.
  f32_sent = 2 * 7 / 8 * 4 * n
  assert report.sent_bytes <= f32_sent * bits / 32 / 0.97
  # Scale bytes within 2% of the payload (n bits / 8 bytes).
  assert scales[0].bytes <= 0.02 * n * bits / 8


def test_e8m0_and_bf16_scales_round_up_and_are_monotone():
  m = jnp.asarray(
    [0.0, 1e-40, 2.0**-126, 1.0, 1.5, 3.0, 4.0, 2.0**127, 3e38, np.inf],
    jnp.float32,
  )
  for fmt in ("e8m0", "bf16"):
    enc, dec = scales.CODECS[fmt]
    words = np.asarray(enc(m))
    back = np.asarray(dec(enc(m)))
    assert np.all(np.diff(words.astype(np.int64)) >= 0)  # integer pmax works
    # Never below the max, within the format's finite range (beyond it the
    # word saturates: test_finite_max_beyond_the_scale_format_stays_finite).
    top = np.asarray(dec(enc(jnp.float32(np.finfo(np.float32).max))))
    within = np.isfinite(back) & (np.asarray(m) <= top)
    assert np.all(back[within] >= np.asarray(m)[within])
    assert back[0] == 0 and back[-1] == np.inf
  e = np.asarray(scales.CODECS["e8m0"][1](scales.CODECS["e8m0"][0](m)))
  np.testing.assert_array_equal(e[3:7], [1.0, 2.0, 4.0, 4.0])


@pytest.mark.parametrize("fmt", ["e8m0", "bf16"])
def test_finite_max_beyond_the_scale_format_stays_finite(fmt):
  # Above 2^127 (e8m0) or the largest bfloat16 (3.3895314e38) no finite
  # scale >= the max-abs exists: the word saturates to the largest finite
  # one (only +inf, a non-finite block, encodes to inf), so a finite step
  # never decodes to NaN.
  big = np.float32(np.finfo(np.float32).max)
  enc, dec = scales.CODECS[fmt]
  back = np.asarray(dec(enc(jnp.asarray([big, np.inf], jnp.float32))))
  assert np.isfinite(back[0]) and back[1] == np.inf
  tx = gqsgd_jax.global_quantize(
    bits=4, granularity="block", block_size=64, scale_format=fmt
  )
  g = np.zeros((4, 100), np.float32)
  g[:, 0] = big
  g[1, 70] = -3.3895316e38
  out, _ = sharded_update(tx, g, tx.init(g[0]))
  assert np.all(np.isfinite(out))
  assert_replicas_equal(out)


@pytest.mark.parametrize("bits", range(2, 9))
def test_default_scales_fit_the_byte_budget(bits):
  # Scale bytes at most 2% of the code bytes, for every bit width.
  config = gq.default_config(bits)
  assert config["granularity"] == "block"
  scale_bits = (
    8
    * {"f32": 4, "bf16": 2, "e8m0": 1}[config["scale_format"]]
    / config["block_size"]
  )
  assert scale_bits <= 0.02 * wire.wire_bits_per_element(bits)
  # global_quantize(bits) with no other argument is that configuration.
  assert gq._resolve_scales(bits, None, None, None) == (
    "block",
    config["block_size"],
    config["scale_format"],
  )
