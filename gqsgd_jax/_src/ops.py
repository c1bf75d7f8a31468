"""The kernels as JAX ops: FFI custom calls with pure-XLA twins.

Every op takes ``impl``:

* ``"auto"`` (default): the FFI handler on each platform that has one
  registered, the pure-XLA twin elsewhere (``lax.platform_dependent``), so a
  CPU-only build still runs on a GPU host.
* ``"ffi"``: the FFI handler; raises if none is registered for the default
  backend.
* ``"xla"``: the pure-jnp twin from ``reference.py``.

Both paths give bit-identical results for the same seed. Per-step values
(scales, seeds, counts) are operands; only static layout (bits, levels,
offsets) are attributes, so nothing recompiles from step to step.

All ffi_calls use ``vmap_method="sequential"``: the scale operand of a
quantizer usually comes from the whole buffer, and broadcasting a batch into
one call would apply one row's scale and random stream to every row.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from gqsgd_jax._src import ffi as ffi_lib
from gqsgd_jax._src import reference
from gqsgd_jax._src import wire

IMPLS = ("auto", "ffi", "xla")


def validate_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  return impl


def _backend_platform() -> str:
  """The default backend as platform_dependent names it ("gpu" -> "cuda")."""
  backend = jax.default_backend()
  if backend == "gpu":
    version = jax.devices()[0].client.platform_version.lower()
    return "rocm" if "rocm" in version else "cuda"
  return backend


def _select(
  impl: str,
  ffi_fn: Callable,
  xla_fn: Callable,
  platforms: frozenset[str] | None = None,
) -> Callable:
  """The op for ``impl``; ``platforms`` limits the FFI handler to those."""
  validate_impl(impl)
  ffi_fn = _with_vma(ffi_fn)
  registered = ffi_lib.REGISTERED_PLATFORMS
  if platforms is not None:
    registered = registered & platforms
  if impl == "xla":
    return xla_fn
  if impl == "ffi":
    backend = _backend_platform()
    if backend not in registered:
      raise RuntimeError(
        f"impl='ffi' was requested, but no gqsgd_jax FFI module is "
        f"registered for the {backend!r} backend (registered: "
        f"{sorted(registered) or 'none'}). Rebuild the "
        "package (pip install .) or use impl='auto' or 'xla'."
      )
    return ffi_fn

  def dispatch(*args: jax.Array) -> jax.Array:
    per_platform = dict.fromkeys(registered, ffi_fn)
    return jax.lax.platform_dependent(*args, default=xla_fn, **per_platform)

  return dispatch


def _with_vma(ffi_fn: Callable) -> Callable:
  """Gives the ffi_call result the varying-axes type of its operands.

  Inside ``shard_map(check_vma=True)`` ffi_call results come back typed as
  invariant (JAX 0.10 computes but drops the vma), which breaks
  ``platform_dependent`` and psum typing; this re-types them (no data moves).
  """

  def wrapped(*args: jax.Array) -> jax.Array:
    vma = set().union(*(_varying_axes(a) for a in args))

    def retype(out: jax.Array) -> jax.Array:
      missing = tuple(sorted(vma - _varying_axes(out)))
      return jax.lax.pcast(out, missing, to="varying") if missing else out

    # One result, or a tuple of them (a kernel with several outputs).
    return jax.tree.map(retype, ffi_fn(*args))

  return wrapped


def _varying_axes(x: jax.Array) -> set[str]:
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10
  if mat is not None:
    return set(mat.varying)
  return set(getattr(aval, "vma", ()))


def _scalar_f32(x: ArrayLike) -> jax.Array:
  return jnp.asarray(x, jnp.float32).reshape(())


def _seed(seed: ArrayLike) -> jax.Array:
  seed = jnp.asarray(seed)
  if seed.dtype != jnp.uint32 or seed.shape != (2,):
    raise ValueError(
      f"seed must be uint32[2] (see seed_from_key), got {seed.dtype}"
      f"{list(seed.shape)}"
    )
  return seed


# kernels.h kOneScale: the scale_shift that makes one scale cover any buffer.
_ONE_SCALE = 62


def validate_block_size(block_size: object) -> int:
  """Checks a block-scale size: a power of two in [1, 2^30]."""
  if (
    isinstance(block_size, bool)
    or not isinstance(block_size, (int, np.integer))
    or not 1 <= block_size <= 2**30
    or (block_size & (block_size - 1))
  ):
    raise ValueError(
      f"block_size must be a power of two in [1, 2^30], got {block_size!r}"
    )
  return int(block_size)


def num_scale_blocks(n: int, block_size: int) -> int:
  """Scales that n elements need in blocks of ``block_size``."""
  return -(-n // block_size)


def _scales(
  scale: ArrayLike, n: int, block_size: int | None
) -> tuple[jax.Array, jax.Array, int, int | None]:
  """(scale operand of the FFI, of the twin, scale_shift, twin block_shift).

  One scale: the FFI gets f32[1] with kOneScale, the twin the scalar. Block
  scales: f32[ceil(n / block_size)] for both.
  """
  if block_size is None:
    s = _scalar_f32(scale)
    return s.reshape(1), s, _ONE_SCALE, None
  block_size = validate_block_size(block_size)
  s = jnp.asarray(scale)
  want = (num_scale_blocks(n, block_size),)
  if s.shape != want or s.dtype != jnp.float32:
    raise ValueError(
      f"scale must be float32{list(want)} (one per block of {block_size} "
      f"of {n} elements), got {s.dtype}{list(s.shape)}"
    )
  shift = block_size.bit_length() - 1
  return s, s, shift, shift


# Blocks of the partial maxima behind a single max-abs: enough elements per
# block to amortise its loop, few enough blocks for the threads to share.
_MAX_ABS_SHIFT = 16


def block_max_abs(
  x: ArrayLike, block_size: int, *, impl: str = "auto"
) -> jax.Array:
  """Each block's max-abs: float32[ceil(n / B)], B = ``block_size``.

  A block holding any NaN or Inf gives +inf, subnormals read as zero (as
  in the quantize kernels), the last block may be short and needs no
  padding. One pass over ``x`` on CPU (an FFI kernel); elsewhere XLA's own
  fused reduction (``reference.block_max_abs``), which is as fast there.
  """
  x = _float_input(x)
  block_size = validate_block_size(block_size)
  shift = block_size.bit_length() - 1
  out = jax.ShapeDtypeStruct(
    (num_scale_blocks(x.shape[0], block_size),), jnp.float32
  )

  def ffi_fn(x: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call(
      "gqsgd_block_max_abs", out, vmap_method="sequential"
    )(x, shift=np.int32(shift))

  def xla_fn(x: jax.Array) -> jax.Array:
    return reference.block_max_abs(x, shift)

  return _select(impl, ffi_fn, xla_fn, frozenset({"cpu"}))(x)


def max_abs(x: ArrayLike, *, impl: str = "auto") -> jax.Array:
  """float32[]: the max-abs of ``x`` (+inf if any element is NaN or Inf, 0 if
  empty).

  The max of ``block_max_abs``'s partial maxima, which are never NaN, so
  XLA's max is safe on them (see nonfinite.py).
  """
  partial = block_max_abs(x, 1 << _MAX_ABS_SHIFT, impl=impl)
  return jnp.max(partial, initial=0.0)


def seed_from_key(key: jax.Array) -> jax.Array:
  """The uint32[2] seed operand of the kernels, drawn from a PRNG key."""
  return jax.random.bits(key, (2,), jnp.uint32)


_FLOAT_INPUTS = (
  np.dtype(np.float32),
  np.dtype(jnp.bfloat16),
  np.dtype(np.float16),
)


def _float_input(x: ArrayLike, name: str = "x") -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype not in _FLOAT_INPUTS:
    raise TypeError(
      f"{name} must be float32, bfloat16 or float16, got {x.dtype}"
    )
  return x.reshape(-1)


def quantize(
  x: ArrayLike,
  scale: ArrayLike,
  seed: ArrayLike,
  *,
  levels: int,
  bits: int,
  signed_codes: bool = False,
  block_size: int | None = None,
  impl: str = "auto",
) -> jax.Array:
  """Stochastic rounding of ``x * scale`` to integer codes in [-levels, levels].

  Args:
    x: float32/bfloat16/float16 array (flattened).
    scale: float32 scalar multiplier applied before rounding (e.g. s / M),
      or with ``block_size`` one multiplier per block: float32[ceil(n / B)],
      element i using scale[i // B].
    seed: uint32[2] operand of the counter-based generator.
    levels: per-worker level count s.
    bits: code width on the wire, 2..8.
    signed_codes: int8 codes q (bits must be 8); otherwise offset-binary
      codes q + s packed into uint8 (bits divides 8) or uint32 words.
    block_size: elements per scale B (a power of two), or None for one
      scalar scale.
    impl: "auto", "ffi" or "xla".

  Returns:
    int8[n] or the packed words, ``wire.num_words(n, bits)`` of them.
  """
  bits = wire.validate_bits(bits)
  if signed_codes and bits != 8:
    raise ValueError(f"signed_codes needs bits=8, got bits={bits}")
  if not 1 <= levels <= wire.max_levels(bits, signed_codes):
    raise ValueError(
      f"levels must be in [1, {wire.max_levels(bits, signed_codes)}] for "
      f"bits={bits}, got {levels}"
    )
  x = _float_input(x)
  n = x.shape[0]
  out = jax.ShapeDtypeStruct(
    (wire.num_words(n, bits, signed_codes),),
    wire.word_dtype(bits, signed_codes),
  )
  ffi_scale, xla_scale, shift, block_shift = _scales(scale, n, block_size)

  def ffi_fn(x: jax.Array, scale: jax.Array, seed: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call("gqsgd_quantize", out, vmap_method="sequential")(
      x,
      scale.reshape(-1),
      seed,
      levels=np.int32(levels),
      bits=np.int32(bits),
      signed_codes=np.bool_(signed_codes),
      scale_shift=np.int32(shift),
    )

  def xla_fn(x: jax.Array, scale: jax.Array, seed: jax.Array) -> jax.Array:
    return reference.quantize(
      x,
      scale.reshape(xla_scale.shape),
      seed,
      levels=levels,
      bits=bits,
      signed_codes=signed_codes,
      block_shift=block_shift,
    )

  return _select(impl, ffi_fn, xla_fn)(x, ffi_scale, _seed(seed))


def dequantize(
  codes: ArrayLike,
  scale: ArrayLike,
  *,
  n: int,
  bits: int,
  offset: int,
  signed_codes: bool = False,
  block_size: int | None = None,
  impl: str = "auto",
) -> jax.Array:
  """Unpacks codes and returns ``(code - offset) * scale`` as float32[n].

  ``scale``: a float32 scalar, or with ``block_size`` float32[ceil(n / B)].
  """
  bits = wire.validate_bits(bits)
  codes = jnp.asarray(codes)
  want = (wire.num_words(n, bits, signed_codes),)
  if codes.shape != want or codes.dtype != wire.word_dtype(bits, signed_codes):
    raise ValueError(
      f"codes must be {wire.word_dtype(bits, signed_codes)}{list(want)} for "
      f"n={n}, bits={bits}, got {codes.dtype}{list(codes.shape)}"
    )
  out = jax.ShapeDtypeStruct((n,), jnp.float32)
  ffi_scale, xla_scale, shift, block_shift = _scales(scale, n, block_size)

  def ffi_fn(codes: jax.Array, scale: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call("gqsgd_dequantize", out, vmap_method="sequential")(
      codes,
      scale,
      bits=np.int32(bits),
      signed_codes=np.bool_(signed_codes),
      offset=np.int32(offset),
      scale_shift=np.int32(shift),
    )

  def xla_fn(codes: jax.Array, scale: jax.Array) -> jax.Array:
    return reference.dequantize(
      codes,
      scale.reshape(xla_scale.shape),
      n=n,
      bits=bits,
      offset=offset,
      signed_codes=signed_codes,
      block_shift=block_shift,
    )

  return _select(impl, ffi_fn, xla_fn)(codes, ffi_scale)


# Largest n_a + n_b that ``average`` serves (math.h kMaxAverageCount): the
# butterfly's worker limit.
MAX_AVERAGE_COUNT = 2**16


def _check_counts(n_a: ArrayLike, n_b: ArrayLike) -> None:
  """Checks the counts of ``average`` where they are known at trace time."""
  values = []
  for name, n in (("n_a", n_a), ("n_b", n_b)):
    if isinstance(n, jax.core.Tracer):
      return  # traced: the caller guarantees the range (see average)
    n = np.asarray(n)
    if n.size != 1 or not np.issubdtype(n.dtype, np.integer):
      raise ValueError(
        f"{name} must be an integer scalar, got {n.dtype}{list(n.shape)}"
      )
    values.append(int(n.reshape(())))
  n_a, n_b = values
  if n_a < 1 or n_b < 1 or n_a + n_b > MAX_AVERAGE_COUNT:
    raise ValueError(
      f"n_a and n_b must be >= 1 with n_a + n_b <= {MAX_AVERAGE_COUNT}, "
      f"got n_a={n_a}, n_b={n_b}"
    )


def average(
  a: ArrayLike,
  b: ArrayLike,
  n_a: ArrayLike,
  n_b: ArrayLike,
  seed: ArrayLike,
  *,
  bits: int,
  impl: str = "auto",
) -> jax.Array:
  """Lane-wise SR((n_a*a + n_b*b) / (n_a + n_b)) of two packed buffers.

  ``n_a``, ``n_b``: int32 scalars, the worker counts behind each operand,
  with n_a, n_b >= 1 and n_a + n_b <= ``MAX_AVERAGE_COUNT`` (2^16). They may
  differ per device, so they are operands. Counts known at trace time are
  checked here (ValueError); traced counts cannot be, and the CPU handler
  rejects them at run time, while the CUDA kernel and the XLA twin return
  unspecified codes for them: callers with traced counts must bound them
  (``global_quantize`` limits the worker count).
  """
  bits = wire.validate_bits(bits)
  _check_counts(n_a, n_b)
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape or a.dtype != b.dtype or a.ndim != 1:
    raise ValueError("a and b must be 1-D packed buffers of equal shape")
  if a.dtype != wire.word_dtype(bits):
    raise ValueError(
      f"packed words for bits={bits} are {wire.word_dtype(bits)}, got {a.dtype}"
    )
  out = jax.ShapeDtypeStruct(a.shape, a.dtype)
  n_a = jnp.asarray(n_a, jnp.int32).reshape(())
  n_b = jnp.asarray(n_b, jnp.int32).reshape(())

  def ffi_fn(
    a: jax.Array, b: jax.Array, n_a: jax.Array, n_b: jax.Array, seed: jax.Array
  ) -> jax.Array:
    return jax.ffi.ffi_call("gqsgd_average", out, vmap_method="sequential")(
      a, b, n_a, n_b, seed, bits=np.int32(bits)
    )

  def xla_fn(
    a: jax.Array, b: jax.Array, n_a: jax.Array, n_b: jax.Array, seed: jax.Array
  ) -> jax.Array:
    return reference.average(a, b, n_a, n_b, seed, bits=bits)

  return _select(impl, ffi_fn, xla_fn)(a, b, n_a, n_b, _seed(seed))


def exp_encode(
  x: ArrayLike,
  scale: ArrayLike,
  seed: ArrayLike,
  *,
  floor_code: int = 127,
  block_size: int | None = None,
  impl: str = "auto",
) -> jax.Array:
  """Exponential dithering of ``x * scale`` (``|x * scale| <= 1/2``) to bytes.

  Byte = sign << 7 | e with value ±2^-e, e in [1, floor_code]; 0 is zero.
  ``scale``: a float32 scalar, or with ``block_size`` float32[ceil(n / B)].
  """
  if not 1 <= floor_code <= 127:
    raise ValueError(f"floor_code must be in [1, 127], got {floor_code}")
  x = _float_input(x)
  out = jax.ShapeDtypeStruct(x.shape, jnp.uint8)
  ffi_scale, xla_scale, shift, block_shift = _scales(
    scale, x.shape[0], block_size
  )

  def ffi_fn(x: jax.Array, scale: jax.Array, seed: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call("gqsgd_exp_encode", out, vmap_method="sequential")(
      x,
      scale,
      seed,
      floor_code=np.int32(floor_code),
      scale_shift=np.int32(shift),
    )

  def xla_fn(x: jax.Array, scale: jax.Array, seed: jax.Array) -> jax.Array:
    return reference.exp_encode(
      x,
      scale.reshape(xla_scale.shape),
      seed,
      floor_code=floor_code,
      block_shift=block_shift,
    )

  return _select(impl, ffi_fn, xla_fn)(x, ffi_scale, _seed(seed))


def exp_decode(
  codes: ArrayLike,
  scale: ArrayLike,
  *,
  block_size: int | None = None,
  impl: str = "auto",
) -> jax.Array:
  """Decodes exponential bytes to ±2^-e * scale (float32).

  ``scale``: a float32 scalar, or with ``block_size`` float32[ceil(n / B)].
  """
  codes = jnp.asarray(codes)
  if codes.dtype != jnp.uint8 or codes.ndim != 1:
    raise ValueError(
      f"codes must be uint8[n], got {codes.dtype}{list(codes.shape)}"
    )
  out = jax.ShapeDtypeStruct(codes.shape, jnp.float32)
  ffi_scale, xla_scale, shift, block_shift = _scales(
    scale, codes.shape[0], block_size
  )

  def ffi_fn(codes: jax.Array, scale: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call("gqsgd_exp_decode", out, vmap_method="sequential")(
      codes, scale, scale_shift=np.int32(shift)
    )

  def xla_fn(codes: jax.Array, scale: jax.Array) -> jax.Array:
    return reference.exp_decode(
      codes, scale.reshape(xla_scale.shape), block_shift=block_shift
    )

  return _select(impl, ffi_fn, xla_fn)(codes, ffi_scale)


def exp_reduce(
  a: ArrayLike, b: ArrayLike, seed: ArrayLike, *, impl: str = "auto"
) -> jax.Array:
  """Pairwise stochastic reduce of two exponential byte buffers (§3.3)."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  if (
    a.shape != b.shape
    or a.dtype != jnp.uint8
    or b.dtype != jnp.uint8
    or (a.ndim != 1)
  ):
    raise ValueError("a and b must be uint8[n] of equal length")
  out = jax.ShapeDtypeStruct(a.shape, jnp.uint8)

  def ffi_fn(a: jax.Array, b: jax.Array, seed: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call("gqsgd_exp_reduce", out, vmap_method="sequential")(
      a, b, seed
    )

  return _select(impl, ffi_fn, reference.exp_reduce)(a, b, _seed(seed))
