"""One process of the emulated-cluster benchmark: compile, then time steps.

Started by benchmarks/cluster_benchmark.py, one copy per network namespace,
with the GQSGD_* variables of ``gqsgd_jax.initialize_distributed``. Talks a
line protocol: it prints ``@@ {json}`` messages (``ready`` once every method
is compiled, ``times`` after each ``run`` command) and reads JSON commands
from stdin (``{"op": "run", "label": ..., "warmup": w, "repeats": r}``,
``{"op": "quit"}``), or takes them from the config's "commands" list (to
run it without the harness, e.g. under ``python -m gqsgd_jax.launch``).
Everything else it prints is a log.

The training step is a wide MLP (default 1024-4096-3072-16, 16.8 M
parameters) with softmax cross-entropy on a small synthetic batch per
process: its compute is small next to moving its gradient over a Gbit link,
so the comparison is about communication. Each method is
``optax.chain(compressor, optax.sgd)`` inside ``jax.shard_map`` over the
"data" axis, compiled once; ``wire_report`` of the compiled step gives the
bytes it really sends.
"""

import argparse
from collections.abc import Callable
import dataclasses
import importlib
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import gqsgd_jax

AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Method:
  """A row of the benchmark: how to build the compressor, and its label.

  ``build(gq)`` receives the public ``gqsgd_jax`` package (None for
  ``module=None``, a method built here) and returns the optax transform;
  ``module`` names the part of the library the method exercises. A method
  whose factory fails is reported as unavailable.
  """

  key: str
  label: str
  module: str | None
  build: Callable


# One line per method. Order = table and plot order.
METHODS = (
  Method("f32", "f32 psum", "baselines", lambda m: m.psum_mean()),
  Method(
    "bf16",
    "bf16 psum",
    "baselines",
    lambda m: m.psum_mean(wire_dtype=jnp.bfloat16),
  ),
  Method(
    "bf16_rsag", "bf16 RS+AG (ppermute)", None, lambda m: bf16_rsag_mean()
  ),
  Method(
    "gq8_psum",
    "GQ 8-bit psum",
    "global_quantize",
    lambda m: m.global_quantize(bits=8, reduction="psum"),
  ),
  Method(
    "gq8_bfly",
    "GQ 8-bit butterfly",
    "global_quantize",
    lambda m: m.global_quantize(bits=8, reduction="butterfly"),
  ),
  Method(
    "gq4_psum",
    "GQ 4-bit psum",
    "global_quantize",
    lambda m: m.global_quantize(bits=4, reduction="psum"),
  ),
  Method(
    "gq4_bfly",
    "GQ 4-bit butterfly",
    "global_quantize",
    lambda m: m.global_quantize(bits=4, reduction="butterfly"),
  ),
  Method(
    "gq8_2shot",
    "GQ 8-bit two-shot (default)",
    "global_quantize",
    lambda m: m.global_quantize(bits=8, reduction="two_shot"),
  ),
  Method(
    "gq4_2shot",
    "GQ 4-bit two-shot (default)",
    "global_quantize",
    lambda m: m.global_quantize(bits=4, reduction="two_shot"),
  ),
  Method(
    "gq_exp",
    "GQ exponential 8-bit",
    "global_quantize",
    lambda m: m.global_quantize(bits=8, dithering="exponential"),
  ),
  Method("thc", "THC 4-bit", "thc", lambda m: m.thc()),
  Method("qsgd", "QSGD 8-bit (all-gather)", "qsgd", lambda m: m.qsgd()),
  Method(
    "powersgd",
    "PowerSGD rank 4",
    "powersgd",
    lambda m: m.powersgd(rank=4, start_iter=0),
  ),
  Method("acpsgd", "ACP-SGD rank 4", "acpsgd", lambda m: m.acpsgd(rank=4)),
  Method("jointsq", "JointSQ ρ=0.032", "jointsq", lambda m: m.jointsq()),
  Method("dgc", "DGC 0.1%", "dgc", lambda m: m.dgc(density=0.001)),
)
# The compute-only reference: the same step without any collective.
LOCAL = Method("local", "no communication", None, lambda m: None)
BY_KEY = {m.key: m for m in METHODS + (LOCAL,)}


def build_transform(method: Method):
  """(transform, None) or (None, why it is unavailable)."""
  try:
    module = importlib.import_module("gqsgd_jax") if method.module else None
    return method.build(module), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def bf16_rsag_mean(axis_name=AXIS):
  """Mean gradient by a bandwidth-optimal bf16 all-reduce built by hand.

  XLA:CPU promotes a bf16 all-reduce to f32, so ``psum_mean(wire_dtype=
  bfloat16)`` sends f32. This is what a bf16 all-reduce sends elsewhere
  (NCCL): a direct reduce-scatter of bf16 chunks over W - 1 ``ppermute``
  shifts, each chunk summed in f32 by its owner, then an ``all_gather`` of
  the bf16 means: 2 (W-1)/W x 2 bytes per element. The bf16 values travel
  bitcast to uint16, since XLA:CPU would widen bf16 collectives to f32.
  """

  def update_fn(updates, state, params=None):
    del params
    w = jax.lax.axis_size(axis_name)
    leaves, treedef = jax.tree.flatten(updates)
    flat = jnp.concatenate([x.astype(jnp.float32).ravel() for x in leaves])
    n = flat.shape[0]
    chunk = -(-n // w)
    # XLA:CPU's float normalization widens every bf16 collective to f32;
    # pure data movement can travel as the same 16 bits in uint16.
    to_u16 = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
    to_f32 = lambda x: jax.lax.bitcast_convert_type(x, jnp.bfloat16).astype(
      jnp.float32
    )
    chunks = jnp.pad(flat, (0, chunk * w - n)).astype(jnp.bfloat16)
    chunks = to_u16(chunks.reshape(w, chunk))
    me = jax.lax.axis_index(axis_name)
    acc = to_f32(chunks[me])
    for k in range(1, w):
      send = jax.lax.dynamic_index_in_dim(chunks, (me + k) % w, 0, False)
      acc = acc + to_f32(
        jax.lax.ppermute(send, axis_name, [(i, (i + k) % w) for i in range(w)])
      )
    mean = to_u16((acc / w).astype(jnp.bfloat16))
    full = to_f32(jax.lax.all_gather(mean, axis_name, to="invarying"))
    full = full.reshape(-1)
    full = full[:n]
    out, start = [], 0
    for x in leaves:
      out.append(full[start : start + x.size].reshape(x.shape).astype(x.dtype))
      start += x.size
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(
    lambda params: optax.EmptyState(), update_fn
  )


def emit(tag: str, **payload):
  sys.stdout.write("@@ " + json.dumps({"tag": tag, **payload}) + "\n")
  sys.stdout.flush()


def mlp_sizes(d_in: int, hidden: tuple, classes: int) -> list[tuple]:
  dims = (d_in,) + tuple(hidden) + (classes,)
  return list(zip(dims[:-1], dims[1:]))


def num_params(d_in: int, hidden: tuple, classes: int) -> int:
  return sum(a * b + b for a, b in mlp_sizes(d_in, hidden, classes))


def run(config: dict):
  gqsgd_jax.initialize_distributed()  # before any other JAX work

  rank = jax.process_index()
  mesh = jax.make_mesh(
    (jax.device_count(),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
  )
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(AXIS))
  hidden = tuple(config["hidden"])
  sizes = mlp_sizes(config["d_in"], hidden, config["classes"])

  def init_params(key):
    params = {}
    for i, (a, b) in enumerate(sizes):
      key, sub = jax.random.split(key)
      params[f"w{i}"] = jax.random.normal(sub, (a, b)) * (2.0 / a) ** 0.5
      params[f"b{i}"] = jnp.zeros((b,))
    return params

  make_params = jax.jit(init_params, out_shardings=replicated)

  def loss_fn(params, batch):
    x, y = batch
    for i in range(len(sizes)):
      x = x @ params[f"w{i}"] + params[f"b{i}"]
      if i < len(sizes) - 1:
        x = jax.nn.relu(x)
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

  rng = np.random.default_rng(1000 + rank)
  x = rng.standard_normal((1, config["batch"], config["d_in"]), np.float32)
  y = rng.integers(0, config["classes"], (1, config["batch"]), np.int32)
  batch = (
    jax.make_array_from_process_local_data(sharded, x),
    jax.make_array_from_process_local_data(sharded, y),
  )
  lr = config["lr"]

  def first(tree):
    return jax.tree.map(lambda a: a[0], tree)

  def stack(tree):
    return jax.tree.map(lambda a: a[None], tree)

  def worker_specs(tx):
    """The library's convention (per_worker_fields on P(AXIS)), if any."""
    try:
      ws = importlib.import_module("gqsgd_jax._src.worker_state")
    except ImportError:
      return None
    shapes = jax.eval_shape(tx.init, make_params(jax.random.PRNGKey(0)))
    return ws.worker_state_specs(shapes, AXIS)

  def compile_method(tx):
    """jit(shard_map(step)) compiled for this method, its state, its layout.

    The optimizer state is laid out as the library documents (fields named
    by ``per_worker_fields`` on P("data"), the rest replicated). If that does
    not type-check, the whole state travels per worker (a leading axis on
    P("data")), and as a last resort shard_map's replication check is off
    (the transform's own tests check that its updates are replicated).
    """
    tx = optax.chain(tx, optax.sgd(lr))
    specs = worker_specs(tx)
    layouts = ([("library", specs, True)] if specs is not None else []) + [
      ("stacked", P(AXIS), True),
      ("stacked, check_vma=False", P(AXIS), False),
    ]
    error = None
    for layout, spec, check_vma in layouts:
      wrap = (lambda t: t) if layout == "library" else stack
      unwrap = (lambda t: t) if layout == "library" else first

      def step(params, opt_state, batch, wrap=wrap, unwrap=unwrap):
        grads = jax.grad(loss_fn)(gqsgd_jax.varying(params, AXIS), first(batch))
        updates, state = tx.update(grads, unwrap(opt_state), params)
        return optax.apply_updates(params, updates), wrap(state)

      try:
        init = jax.jit(
          jax.shard_map(
            lambda p, wrap=wrap: wrap(tx.init(p)),
            mesh=mesh,
            in_specs=P(),
            out_specs=spec,
            check_vma=check_vma,
          )
        )
        fn = jax.jit(
          jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P(), spec, P(AXIS)),
            out_specs=(P(), spec),
            check_vma=check_vma,
          ),
          donate_argnums=(0, 1),
        )
        params = make_params(jax.random.PRNGKey(0))
        state = init(params)
        return fn.lower(params, state, batch).compile(), params, state, (layout)
      except Exception as e:  # pylint: disable=broad-except
        error = error or e
        print(
          f"state layout {layout!r} failed: {str(e).splitlines()[0][:200]}",
          flush=True,
        )
    raise error

  def compile_local():
    def step(params, batch):
      grads = jax.grad(loss_fn)(gqsgd_jax.varying(params, AXIS), first(batch))
      return stack(jax.tree.map(lambda p, g: p - lr * g, params, grads))

    fn = jax.jit(
      jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS))
    )
    params = make_params(jax.random.PRNGKey(0))
    return fn.lower(params, batch).compile(), params

  thunks, wire, unavailable, compile_s, layouts = {}, {}, {}, {}, {}
  for key in config["methods"]:
    method = BY_KEY[key]
    start = time.perf_counter()
    try:
      if key == "local":
        compiled, params = compile_local()
        thunks[key] = lambda c=compiled, p=params: c(p, batch)
      else:
        tx, why = build_transform(method)
        if tx is None:
          unavailable[key] = why
          continue
        compiled, params, state, layouts[key] = compile_method(tx)
        holder = {"params": params, "state": state}

        def thunk(c=compiled, h=holder):
          h["params"], h["state"] = c(h["params"], h["state"], batch)
          return h["params"]

        jax.block_until_ready(thunk())  # one real step: it must run
        thunks[key] = thunk
    except Exception as e:  # pylint: disable=broad-except
      unavailable[key] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
      if rank == 0:
        traceback.print_exc()
      continue
    report = gqsgd_jax.wire_report(compiled, num_devices=jax.device_count())
    wire[key] = {
      "sent_bytes": report.sent_bytes,
      "payload_bytes": report.payload_bytes,
      "scale_bytes": report.scale_bytes,
      "float_payload_bytes": report.float_payload_bytes,
      "by_op": report.by_op,
    }
    compile_s[key] = time.perf_counter() - start
    print(f"compiled {key} in {compile_s[key]:.1f} s", flush=True)

  barrier_in = jax.make_array_from_process_local_data(
    sharded, np.ones((1,), np.float32)
  )
  barrier = jax.jit(
    jax.shard_map(
      lambda v: jax.lax.psum(v, AXIS),
      mesh=mesh,
      in_specs=P(AXIS),
      out_specs=P(),
    )
  )
  jax.block_until_ready(barrier(barrier_in))
  emit(
    "ready",
    rank=rank,
    wire=wire,
    unavailable=unavailable,
    compile_seconds=compile_s,
    state_layouts=layouts,
    devices=jax.device_count(),
    params=num_params(config["d_in"], hidden, config["classes"]),
    jax_version=jax.__version__,
  )

  commands = (
    config["commands"]
    if "commands" in config
    else (json.loads(line) for line in sys.stdin)
  )
  for command in commands:
    if command["op"] == "quit":
      break
    if command["op"] != "run":
      emit("error", message=f"unknown command {command!r}")
      continue
    times = {key: [] for key in thunks}
    for i in range(command["warmup"] + command["repeats"]):
      for key, thunk in thunks.items():
        jax.block_until_ready(barrier(barrier_in))  # start together
        start = time.perf_counter()
        jax.block_until_ready(thunk())
        if i >= command["warmup"]:
          times[key].append(time.perf_counter() - start)
    emit("times", rank=rank, label=command["label"], times=times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--config",
    required=True,
    help="JSON: methods, d_in, hidden, classes, batch, lr",
  )
  args = parser.parse_args()
  try:
    run(json.loads(args.config))
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    emit("error", message=f"{type(e).__name__}: {e}")
    sys.exit(1)


if __name__ == "__main__":
  main()
