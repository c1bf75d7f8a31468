"""Pieces shared by the examples: compressors, the data-parallel step, logs.

Every example runs the same way on one process with simulated devices and
on N processes (``python -m gqsgd_jax.launch -n N -- python
examples/<name>/main.py``): the mesh spans ``jax.devices()`` of all
processes, every process draws the same global batches and feeds only its
own devices' rows (``shard``), params are replicated, and metrics come back
to every host (``to_host``).
"""

import argparse
from collections.abc import Callable, Iterable, Iterator
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import tqdm

import gqsgd_jax

AXIS = "data"
# The library's compressors beyond Global-QSGD, by factory name (also the
# module's), listed when the build has them.
_BASELINES = ("thc", "qsgd", "powersgd", "acpsgd", "jointsq", "dgc")


def _has_baseline(name: str) -> bool:
  # find_spec does not run the module: nothing may touch JAX's backend
  # before setup_devices.
  return hasattr(gqsgd_jax, name) or (
    importlib.util.find_spec(f"gqsgd_jax._src.{name}") is not None
  )


def _baseline_factory(name: str):
  """The library's factory of a baseline (exported, or from its module)."""
  factory = getattr(gqsgd_jax, name, None)
  if factory is None:
    factory = getattr(importlib.import_module(f"gqsgd_jax._src.{name}"), name)
  return factory


COMPRESSORS = ("f32", "bf16", "gqsgd", "gqsgd_feedback", "gqsgd_exp") + tuple(
  name for name in _BASELINES if _has_baseline(name)
)
# Defaults of the baselines' own knobs (bits maps to their levels).
POWERSGD_RANK = 4
POWERSGD_START = 0  # steps of exact averaging first (the reference: 1000)
DGC_DENSITY = 0.01  # fraction of each large tensor sent per step
JOINTSQ_RATIO = 0.032  # code bits per element / 32: ~1 bit per element


def request_cpu_devices(n: int) -> None:
  """Asks for at least ``n`` simulated CPU devices, before JAX starts.

  On a GPU host this only sizes the unused CPU client, so the examples run on
  the real GPUs. A larger earlier request (e.g. the library's test set-up)
  is kept; once a backend is up the devices that exist are used.
  """
  if jax.config.jax_num_cpu_devices >= n:
    return
  with contextlib.suppress(RuntimeError):  # a backend already started
    jax.config.update("jax_num_cpu_devices", n)


def setup_devices(workers: int | None, distributed: bool = False) -> bool:
  """Call first in a main(): join a multi-process run or simulate devices.

  Joins with ``gqsgd_jax.initialize_distributed()`` when ``distributed``
  (then JAX's auto-detection, e.g. SLURM, finds the cluster) or when
  ``gqsgd_jax.launch`` set ``GQSGD_COORDINATOR``; otherwise asks for
  ``workers`` (default 8) simulated CPU devices. Returns whether it joined.
  """
  if distributed or "GQSGD_COORDINATOR" in os.environ:
    gqsgd_jax.initialize_distributed()
    return True
  request_cpu_devices(workers or 8)
  return False


def is_main_process() -> bool:
  return jax.process_index() == 0


def make_mesh(num_workers: int | None = None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over the first ``num_workers`` devices.

  ``None`` takes every device of every process; a multi-process run must
  use them all (a process without a device in the mesh has nothing to do).
  """
  devices = jax.devices()
  num_workers = num_workers or len(devices)
  if num_workers > len(devices):
    raise ValueError(
      f"asked for {num_workers} workers but JAX sees {len(devices)} "
      f"{jax.default_backend()} devices"
    )
  if jax.process_count() > 1 and num_workers != len(devices):
    raise ValueError(
      f"a run of {jax.process_count()} processes uses all "
      f"{len(devices)} devices, not {num_workers}"
    )
  return jax.make_mesh(
    (num_workers,),
    (AXIS,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=devices[:num_workers],
  )


def make_compressor(
  name: str,
  bits: int = 4,
  *,
  axis_name=AXIS,
  seed: int = 0,
  reduction: str = "auto",
  granularity: str | None = None,
  momentum: float = 0.0,
) -> optax.GradientTransformation:
  """The gradient all-reduce of a method, as the first link of a chain.

  Args:
    name: one of ``COMPRESSORS``: "f32" or "bf16" (float psum baselines),
      "gqsgd" (Global-QSGD, standard dithering, ``bits`` per coordinate),
      "gqsgd_feedback" (the same with the two-shot reduction's owner-side
      error feedback, ``owner_feedback=True``), "gqsgd_exp" (exponential
      dithering, 8-bit sign + exponent codes), and
      the library's baselines present: "thc" (2^bits levels), "qsgd"
      (2^(bits-1) - 1 levels, int8 all-gather), "powersgd" (rank
      ``POWERSGD_RANK``), "acpsgd", "jointsq" (ratio ``JOINTSQ_RATIO``),
      "dgc" (density ``DGC_DENSITY``).
    bits: bits per coordinate for "gqsgd", "thc" and "qsgd".
    axis_name: the data-parallel mesh axis.
    seed: seed of the quantizer's dither (and shared random draws).
    reduction: "auto", "psum", "butterfly" or "two_shot" for "gqsgd" (see
      ``gqsgd_jax.global_quantize``); ignored by the others.
    granularity: Global-QSGD's scale: None (the library's default, one
      scale per block of 256 elements), "block", one max-abs per "bucket"
      of 25 MiB (the whole model of each example), per "leaf" (tensor) or
      "global"; ignored by the others.
    momentum: DGC's momentum correction (the outer optimizer must then be
      momentum-free, see ``make_optimizer``); ignored by the others.

  Returns:
    A transform that turns local gradients into the workers' mean gradient.
  """
  if name == "f32":
    return gqsgd_jax.psum_mean(axis_name=axis_name)
  if name == "bf16":
    return gqsgd_jax.psum_mean(axis_name=axis_name, wire_dtype=jnp.bfloat16)
  if name == "gqsgd":
    return gqsgd_jax.global_quantize(
      bits=bits,
      axis_name=axis_name,
      reduction=reduction,
      granularity=granularity,
      key=seed,
    )
  if name == "gqsgd_feedback":
    return gqsgd_jax.global_quantize(
      bits=bits,
      axis_name=axis_name,
      reduction="two_shot",
      owner_feedback=True,
      granularity=granularity,
      key=seed,
    )
  if name == "gqsgd_exp":
    return gqsgd_jax.global_quantize(
      bits=8,
      axis_name=axis_name,
      dithering="exponential",
      granularity=granularity,
      key=seed,
    )
  if name not in COMPRESSORS:
    raise ValueError(f"compressor must be one of {COMPRESSORS}, got {name!r}")
  factory = _baseline_factory(name)
  options = {
    "thc": dict(levels=2**bits),
    "qsgd": dict(levels=2 ** (bits - 1) - 1),
    "powersgd": dict(rank=POWERSGD_RANK, start_iter=POWERSGD_START),
    "acpsgd": dict(rank=POWERSGD_RANK),
    "jointsq": dict(compression_ratio=JOINTSQ_RATIO),
    "dgc": dict(density=DGC_DENSITY, momentum=momentum),
  }[name]
  return factory(axis_name=axis_name, key=seed, **options)


def make_optimizer(
  compressor: str,
  bits: int,
  base: str,
  schedule: optax.Schedule,
  *,
  momentum: float = 0.9,
  seed: int = 0,
  reduction: str = "auto",
  granularity: str | None = None,
  clip_norm: float | None = None,
) -> optax.GradientTransformation:
  """The compressor first (local -> mean gradient), then the optimizer.

  Args:
    compressor, bits, seed, reduction, granularity: as for
      ``make_compressor``.
    base: "sgd" (SGD with ``momentum``) or "adam".
    schedule: the learning rate schedule.
    momentum: SGD's momentum.
    clip_norm: clip the mean gradient's global norm (after the compressor,
      so every worker clips the same gradient).

  DGC keeps its own momentum (momentum correction): with "sgd" it takes
  ``momentum`` and the outer SGD has none; with "adam" it runs with
  momentum 0 (top-k sparsification with a residual memory).
  """
  dgc_momentum = momentum if base == "sgd" else 0.0
  links = [
    make_compressor(
      compressor,
      bits,
      seed=seed,
      reduction=reduction,
      granularity=granularity,
      momentum=dgc_momentum,
    )
  ]
  if clip_norm:
    links.append(optax.clip_by_global_norm(clip_norm))
  if base == "sgd":
    links.append(
      optax.sgd(schedule, momentum=None if compressor == "dgc" else momentum)
    )
  elif base == "adam":
    links.append(optax.adam(schedule))
  else:
    raise ValueError(f"base must be 'sgd' or 'adam', got {base!r}")
  return optax.chain(*links)


def method_name(name: str, bits: int, granularity: str | None = None) -> str:
  """A readable label for logs, tables and plots."""
  if name.startswith("gqsgd") and granularity is not None:
    return f"{method_name(name, bits)}-{granularity}"
  return {
    "gqsgd": f"gqsgd-{bits}bit",
    "gqsgd_feedback": f"gqsgd-{bits}bit-feedback",
    "gqsgd_exp": "gqsgd-exp-8bit",
    "thc": f"thc-{bits}bit",
    "qsgd": f"qsgd-{bits}bit",
    "powersgd": f"powersgd-r{POWERSGD_RANK}",
    "acpsgd": f"acpsgd-r{POWERSGD_RANK}",
    "dgc": f"dgc-{DGC_DENSITY:.0%}",
    "jointsq": f"jointsq-{JOINTSQ_RATIO:g}",
  }.get(name, name)


# ---------------------------------------------------------------------------
# Arrays across devices and processes.


def replicate(tree, mesh):
  """Puts a pytree on every device of ``mesh`` (every process's copy must be
  the same, e.g. params built from the same seed)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
    tree,
  )


def process_rows(sharding: NamedSharding, num_rows: int) -> slice:
  """The rows of a global array split along axis 0 held by this process."""
  spans = sorted(
    {
      index[0].indices(num_rows)[:2]
      for index in sharding.addressable_devices_indices_map(
        (num_rows,)
      ).values()
    }
  )
  for (_, stop), (start, _) in zip(spans, spans[1:]):
    if start != stop:
      raise ValueError(
        "this process's devices are not contiguous on the mesh axis"
      )
  return slice(spans[0][0], spans[-1][1])


def shard(tree, mesh):
  """Splits a pytree of global host arrays along axis 0 over the mesh.

  Every process passes the same global batch and contributes only its own
  devices' rows (``jax.make_array_from_process_local_data``).
  """
  sharding = NamedSharding(mesh, P(AXIS))

  def put(x):
    x = np.asarray(x)
    local = x[process_rows(sharding, x.shape[0])]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  return jax.tree.map(put, tree)


def to_host(tree):
  """NumPy copies of (possibly multi-process) arrays on every process."""

  def get(x):
    if getattr(x, "is_fully_addressable", True):
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)


def params_digest(params) -> str:
  """SHA-256 of replicated params as this process holds them.

  Equal digests on all processes (and devices) mean identical parameters.
  """
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    for s in leaf.addressable_shards:
      data = np.asarray(s.data)
      if s.device == leaf.addressable_shards[0].device:
        h.update(data.tobytes())
      elif not np.array_equal(
        data.view(np.uint8),
        np.asarray(leaf.addressable_shards[0].data).view(np.uint8),
      ):
        raise AssertionError("replicated params differ across devices")
  return h.hexdigest()


# ---------------------------------------------------------------------------
# The data-parallel step.


def _varying(x) -> bool:
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10
  axes = mat.varying if mat is not None else getattr(aval, "vma", ())
  return AXIS in axes


def per_worker_mask(
  tx: optax.GradientTransformation, params, mesh: jax.sharding.Mesh
):
  """Which leaves of ``tx``'s state differ per worker (error memories).

  Error-feedback compressors (THC, PowerSGD, DGC, JointSQ, ...) keep a
  residual per worker, everything else in an optax state is replicated.
  Rather than knowing every state type, trace ``tx.init`` and ``tx.update``
  on local (varying) gradients under ``shard_map`` and read which state
  leaves come out varying, until that set stops growing. Nothing runs.

  Returns:
    A pytree of bools with the structure of the state.

  Raises:
    ValueError: the updates are not replicated (``tx`` does not reduce the
      gradients over the mesh axis).
  """
  found = {}
  lead = lambda t: jax.tree.map(lambda x: x[None], t)

  def init_probe(p):
    state = tx.init(p)
    found["treedef"] = jax.tree.structure(state)
    found["mask"] = [_varying(x) for x in jax.tree.leaves(state)]
    found["shapes"] = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state
    )
    return lead(state)

  jax.eval_shape(
    jax.shard_map(init_probe, mesh=mesh, in_specs=P(), out_specs=P(AXIS)),
    params,
  )
  treedef = found["treedef"]
  # Start from the fields states declare per worker (``per_worker_fields``,
  # see gqsgd_jax's worker_state_specs): a lax.cond in the update may need
  # them varying to trace at all.
  declared = jax.tree.leaves(_declared_per_worker(found["shapes"]))
  mask = [a or b for a, b in zip(found["mask"], declared)]

  def update_probe(p, state):
    leaves = [
      jax.lax.pcast(x, AXIS, to="varying") if m else x
      for x, m in zip(jax.tree.leaves(state), mask)
    ]
    state = jax.tree.unflatten(treedef, leaves)
    updates, state = tx.update(gqsgd_jax.varying(p, AXIS), state, p)
    found["updates_vary"] = any(_varying(u) for u in jax.tree.leaves(updates))
    found["mask"] = [_varying(x) for x in jax.tree.leaves(state)]
    return lead((updates, state))

  while True:
    jax.eval_shape(
      jax.shard_map(
        update_probe, mesh=mesh, in_specs=(P(), P()), out_specs=P(AXIS)
      ),
      params,
      found["shapes"],
    )
    new = [a or b for a, b in zip(mask, found["mask"])]
    if new == mask:
      break
    mask = new
  if found["updates_vary"]:
    raise ValueError(
      "the optimizer's updates differ per worker: its first "
      "link must reduce the gradients over the mesh axis"
    )
  return jax.tree.unflatten(treedef, mask)


def _declared_per_worker(state):
  """True for the leaves of fields a state lists in ``per_worker_fields``."""

  def declares(node) -> bool:
    return bool(getattr(type(node), "per_worker_fields", ()))

  def mark(node):
    if not declares(node):
      return jax.tree.map(lambda _: False, node)
    fields = type(node).per_worker_fields
    return type(node)(
      *[
        jax.tree.map(lambda _, f=f: f in fields, v)
        for f, v in zip(node._fields, node)
      ]
    )

  return jax.tree.map(mark, state, is_leaf=declares)


def _specs(mask):
  return jax.tree.map(lambda m: P(AXIS) if m else P(), mask)


def _unstack(state, mask):
  # A per-worker leaf travels as one block [1, ...] of a global [W, ...].
  return jax.tree.map(lambda x, m: x[0] if m else x, state, mask)


def _stack(state, mask):
  return jax.tree.map(lambda x, m: x[None] if m else x, state, mask)


def init_opt_state(
  tx: optax.GradientTransformation, params, mesh: jax.sharding.Mesh
):
  """``tx``'s initial state on the mesh, and its per-worker mask.

  The state is created inside the map: replicated leaves are replicated,
  per-worker leaves (``per_worker_mask``) are global arrays [W, ...] whose
  block i is worker i's copy. Pass the mask to ``make_train_step``.
  """
  mask = per_worker_mask(tx, params, mesh)
  init = jax.jit(
    jax.shard_map(
      lambda p: _stack(tx.init(p), mask),
      mesh=mesh,
      in_specs=P(),
      out_specs=_specs(mask),
    )
  )
  return init(params), mask


LossFn = Callable[[Any, Any], tuple[jax.Array, dict]]


def make_train_step(
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  state_mask=None,
):
  """A jitted data-parallel step ``(params, opt_state, batch) -> ...``.

  ``loss_fn(params, local_batch) -> (loss, metrics)`` sees one device's
  shard. Params are plain pytrees, replicated; the optimizer state is
  replicated too except for the per-worker leaves of ``state_mask`` (from
  ``init_opt_state``; None: all replicated); the batch is sharded along
  axis 0. The step returns the new params and state, and each device's loss
  and metrics stacked along a leading axis (average them on the host:
  reducing them in the step would add a collective).

  The step works on pytrees and calls ``tx.update`` itself rather than going
  through ``nnx.Optimizer``: that is the pattern the library documents, it
  shows exactly where local gradients become the mean gradient, and it keeps
  NNX's in-place module updates out of the shard_map.
  """
  state_specs = P() if state_mask is None else _specs(state_mask)

  def step(params, opt_state, batch):
    if state_mask is not None:
      opt_state = _unstack(opt_state, state_mask)
    # Differentiating w.r.t. varying(params) keeps gradients local: w.r.t.
    # replicated params, JAX would all-reduce them in f32 by itself.
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(gqsgd_jax.varying(params, AXIS), batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = jax.tree.map(
      lambda m: jnp.reshape(m, (1,)), {"loss": loss, **metrics}
    )
    if state_mask is not None:
      opt_state = _stack(opt_state, state_mask)
    return params, opt_state, metrics

  # check_vma=True (the default) makes shard_map track which values differ
  # across devices: that is what lets varying() keep gradients local, and it
  # checks that the updated params really are replicated (out_specs=P()).
  return jax.jit(
    jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(P(), state_specs, P(AXIS)),
      out_specs=(P(), state_specs, P(AXIS)),
    )
  )


def make_eval_step(
  metric_fn: Callable[[Any, Any], dict], mesh: jax.sharding.Mesh
):
  """A jitted ``(params, batch) -> per-device metrics`` over the mesh.

  Scalars come back stacked [W]; arrays (e.g. per-example predictions) are
  concatenated along axis 0, in batch order.
  """

  def step(params, batch):
    return jax.tree.map(
      lambda m: jnp.reshape(m, (-1,) + jnp.shape(m)[1:]),
      metric_fn(params, batch),
    )

  return jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS))
  )


def pad_rows(arrays: tuple, multiple: int) -> tuple[tuple, np.ndarray]:
  """Pads host arrays along axis 0 to a multiple; returns them and a 0/1
  weight per row (0 for padding)."""
  n = len(arrays[0])
  pad = (-n) % multiple
  weight = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  padded = tuple(
    np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in arrays
  )
  return padded, weight


def wire_summary(compiled) -> dict:
  """Collective bytes per step and device of a compiled step, as a dict."""
  report = gqsgd_jax.wire_report(compiled)
  return {
    "payload_bytes": report.payload_bytes,
    "scale_bytes": report.scale_bytes,
    "float_payload_bytes": report.float_payload_bytes,
    "total_bytes": report.total_bytes,
    "sent_bytes": report.sent_bytes,
    "by_op": report.by_op,
  }


def num_elements(tree) -> int:
  return int(
    sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree))
  )


def train_loop(
  train_step,
  params,
  opt_state,
  batches: Iterator,
  mesh,
  *,
  steps: int,
  eval_every: int,
  evaluate: Callable[[Any], dict],
  desc: str,
  show_progress: bool = True,
):
  """Compiles the step on the first batch, then trains for ``steps``.

  ``batches`` yields global host batches (see ``shard``); ``evaluate(params)``
  returns test metrics, run every ``eval_every`` steps and at the end.

  Returns:
    (params, opt_state, history, wire, timing): history holds one record
    per step (``train_<metric>`` averaged over devices, plus test metrics
    when evaluated); wire is ``wire_summary`` of the compiled step; timing
    holds the compile time and the mean wall time of a step (evaluations
    excluded), in seconds.
  """
  batch = shard(next(batches), mesh)
  # Compile once, read the wire bytes off that executable, and run it.
  start = time.perf_counter()
  compiled = train_step.lower(params, opt_state, batch).compile()
  timing = {"compile_s": time.perf_counter() - start}
  wire = wire_summary(compiled)
  history = []
  step_time = 0.0
  bar = progress(
    range(1, steps + 1),
    total=steps,
    desc=desc,
    enabled=show_progress and is_main_process(),
  )
  for step in bar:
    start = time.perf_counter()
    params, opt_state, metrics = compiled(params, opt_state, batch)
    # Blocking every step keeps simulated CPU devices in lockstep: an
    # unbounded queue of collectives can time out in XLA's rendezvous.
    jax.block_until_ready((params, opt_state, metrics))
    metrics = to_host(metrics)
    step_time += time.perf_counter() - start
    record = {"step": step}
    record.update({f"train_{k}": float(np.mean(v)) for k, v in metrics.items()})
    if step % eval_every == 0 or step == steps:
      record.update(evaluate(params))
    history.append(record)
    bar.set_postfix(loss=f"{record['train_loss']:.3f}")
    if step < steps:
      start = time.perf_counter()
      batch = shard(next(batches), mesh)
      step_time += time.perf_counter() - start
  timing["step_s"] = step_time / steps
  return params, opt_state, history, wire, timing


@dataclasses.dataclass
class RunConfig:
  """The options every example's Config has; each subclass adds its model's
  and data's fields and may change the defaults (``steps`` and below)."""

  compressor: str = "gqsgd"  # one of common.COMPRESSORS
  bits: int = 4  # bits per coordinate for gqsgd, thc, qsgd
  reduction: str = (
    "auto"  # gqsgd's reduction: auto | psum | butterfly | two_shot
  )
  # gqsgd's scales: None (the library's default: blocks) | block | bucket |
  # leaf | global
  granularity: str | None = None
  workers: int | None = None  # data-parallel devices; None: all of them
  steps: int = 500
  batch_size: int = 128  # global, split evenly over the workers
  learning_rate: float = 0.1  # peak of the schedule
  seed: int = 0  # params, data order and quantizer dither
  eval_every: int = 100  # steps between test-set evaluations
  data: str | None = None  # the user's data file (default: bundled data)
  log: str | None = None  # JSON log path
  progress: bool = True  # tqdm bar


@dataclasses.dataclass
class Task:
  """What an example brings to ``train_and_evaluate``: model, data, metric.

  Attributes:
    params: the model's initial parameters (a pytree, the same on every
      process).
    optimizer: the compressor first, then the optimizer
      (``make_optimizer``).
    loss_fn: ``(params, local_batch) -> (loss, metrics)`` on one shard.
    eval_fn: ``(params, local_batch) -> dict`` on one shard of the test
      set (see ``make_eval_step``).
    batches: endless global host batches (see ``shard``).
    evaluate: ``(eval_step, params, mesh) -> test metrics``, the
      ``test_*`` entries of the history.
    extra: ``params -> dict`` of further entries for the final record.
  """

  params: Any
  optimizer: optax.GradientTransformation
  loss_fn: LossFn
  eval_fn: Callable[[Any, Any], dict]
  batches: Iterator
  evaluate: Callable[[Any, Any, jax.sharding.Mesh], dict]
  extra: Callable[[Any], dict] = lambda params: {}


def train_and_evaluate(
  example: str, config: RunConfig, make_task: Callable[[Any], Task]
) -> dict:
  """Trains ``make_task(config)`` data-parallel; returns the final record.

  Builds the mesh of ``config.workers``, replicates the params, trains
  ``config.steps`` steps (``train_loop``) and evaluates every
  ``config.eval_every``. Writes the JSON log (config, wire bytes, history,
  final metrics) to ``config.log`` if set (process 0 of a multi-process
  run).
  """
  start = time.perf_counter()
  mesh = make_mesh(config.workers)
  workers = mesh.devices.size
  if config.batch_size % workers:
    raise ValueError(
      f"batch_size {config.batch_size} is not a multiple of {workers} workers"
    )
  task = make_task(config)
  params = replicate(task.params, mesh)
  opt_state, state_mask = init_opt_state(task.optimizer, params, mesh)
  train_step = make_train_step(task.loss_fn, task.optimizer, mesh, state_mask)
  eval_step = make_eval_step(task.eval_fn, mesh)
  name = method_name(config.compressor, config.bits, config.granularity)
  params, _, history, wire, timing = train_loop(
    train_step,
    params,
    opt_state,
    task.batches,
    mesh,
    steps=config.steps,
    eval_every=config.eval_every,
    evaluate=lambda p: task.evaluate(eval_step, p, mesh),
    desc=name,
    show_progress=config.progress,
  )
  return finish(
    example,
    name,
    config,
    params,
    history,
    wire,
    timing,
    start,
    workers=workers,
    num_params=num_elements(params),
    **task.extra(params),
  )


def finish(
  example: str,
  name: str,
  config,
  params,
  history: list[dict],
  wire: dict,
  timing: dict,
  start: float,
  **extra,
) -> dict:
  """The final record of a run; process 0 writes the JSON log.

  The record holds the last step's metrics, ``extra``, the wire bytes, the
  timings, the process count and the params' digest (every process
  computes its own).
  """
  final = dict(history[-1])
  final.update(extra)
  final.update(
    processes=jax.process_count(),
    params_digest=params_digest(params),
    wall_time_s=time.perf_counter() - start,
    **timing,
    **wire,
  )
  if config.log and is_main_process():
    write_log(
      config.log,
      {
        "example": example,
        "name": name,
        "config": dataclasses.asdict(config),
        "backend": jax.default_backend(),
        "wire": wire,
        "history": history,
        "final": final,
      },
    )
  return final


def report(final: dict) -> str:
  """What main.py prints: one line of results, then a digest line that every
  process prints (multi-process runs compare them). ``--log`` writes the
  whole record (history, wire bytes per collective, config) as JSON."""
  metrics = " ".join(
    f"{k} {v:.4g}"
    for k, v in final.items()
    if k.startswith(("test_", "train_")) and isinstance(v, (int, float))
  )
  summary = (
    f"RESULT step {final['step']} {metrics} | sent "
    f"{final['sent_bytes']:,.0f} B/step/device (payload "
    f"{final['payload_bytes']:,} B, float {final['float_payload_bytes']:,}"
    f" B) | step {1e3 * final['step_s']:.1f} ms, compile "
    f"{final['compile_s']:.1f} s, wall {final['wall_time_s']:.1f} s"
  )
  return (
    summary + f"\nPARAMS_DIGEST {final['params_digest']} process "
    f"{jax.process_index()}/{jax.process_count()} devices "
    f"{jax.device_count()}"
  )


def progress(
  iterable: Iterable,
  *,
  total: int,
  desc: str,
  enabled: bool = True,
  every: int | None = None,
  stream=None,
):
  """Progress of a loop: a tqdm bar on a terminal, else a line every N steps.

  Output to a file or a pipe (CI logs, ``gqsgd_jax.launch``) gets a plain
  line every ``every`` steps (default: a tenth of ``total``) and at the
  end, so a long run shows that it is moving.
  """
  stream = stream or sys.stderr
  if not enabled:
    return _LineProgress(iterable, total, desc, every=0, stream=stream)
  if stream.isatty():
    return tqdm.tqdm(
      iterable,
      total=total,
      desc=desc,
      dynamic_ncols=True,
      leave=False,
      file=stream,
    )
  return _LineProgress(
    iterable, total, desc, every=every or max(1, total // 10), stream=stream
  )


class _LineProgress:
  """tqdm's loop interface, printing one line every ``every`` steps."""

  def __init__(self, iterable, total, desc, *, every, stream):
    self.iterable, self.total, self.desc = iterable, total, desc
    self.every, self.stream = every, stream
    self.postfix = ""

  def set_postfix(self, **values):
    self.postfix = " ".join(f"{k} {v}" for k, v in values.items())

  def __iter__(self):
    start = time.perf_counter()
    for count, item in enumerate(self.iterable, 1):
      yield item
      if self.every and (count % self.every == 0 or count == self.total):
        print(
          f"{self.desc}: step {count}/{self.total} {self.postfix} "
          f"({time.perf_counter() - start:.1f} s)",
          file=self.stream,
          flush=True,
        )


def write_log(path: str | os.PathLike, record: dict) -> None:
  """Writes one run's record (config, wire bytes, history, final) as JSON."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(record, indent=1, default=_to_json))


def read_log(path: str | os.PathLike) -> dict:
  return json.loads(pathlib.Path(path).read_text())


def _to_json(x):
  if isinstance(x, (np.generic, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, (tuple, set)):
    return list(x)
  raise TypeError(f"cannot write {type(x).__name__} to a JSON log")


# ---------------------------------------------------------------------------
# Command lines.


def add_run_args(parser) -> None:
  """The options every example's main.py takes (None: the config's)."""
  parser.add_argument("--compressor", choices=COMPRESSORS)
  parser.add_argument(
    "--bits", type=int, help="bits per coordinate (gqsgd, thc, qsgd)"
  )
  parser.add_argument(
    "--reduction",
    choices=("auto", "psum", "butterfly", "two_shot"),
    help="Global-QSGD's integer reduction (default auto)",
  )
  parser.add_argument(
    "--granularity",
    choices=("block", "bucket", "leaf", "global"),
    help="Global-QSGD's scales: per block of 256 elements (default), per "
    "25 MiB bucket, per tensor, or one for the model",
  )
  parser.add_argument(
    "--workers",
    type=int,
    help="data-parallel devices (default: 8 simulated CPU "
    "devices, every GPU, or every device of a "
    "multi-process run)",
  )
  parser.add_argument("--steps", type=int)
  parser.add_argument("--seed", type=int)
  parser.add_argument("--batch-size", type=int, help="global batch size")
  parser.add_argument("--lr", type=float, dest="learning_rate")
  parser.add_argument("--log", help="write the run's JSON log here")
  parser.add_argument(
    "--no-progress",
    dest="progress",
    action="store_false",
    default=None,
    help="no progress bar",
  )
  parser.add_argument(
    "--distributed",
    action="store_true",
    help="join a multi-process run through JAX's cluster "
    "auto-detection (SLURM, Open MPI, ...); implied under "
    "python -m gqsgd_jax.launch",
  )


def config_overrides(args) -> dict:
  """The options given on the command line, as config fields."""
  return {
    k: v for k, v in vars(args).items() if v is not None and k != "distributed"
  }


def main(
  example: str,
  description: str,
  add_args: Callable[[argparse.ArgumentParser], None] | None = None,
  argv=None,
) -> None:
  """The main() of ``examples/<example>/main.py``: options, run, report.

  Parses ``add_run_args``' options and the example's own (``add_args``),
  sets up the devices before anything starts JAX's backend, overrides the
  example's default config with the options given, trains and prints
  ``report``.
  """
  parser = argparse.ArgumentParser(description=description)
  add_run_args(parser)
  if add_args is not None:
    add_args(parser)
  args = parser.parse_args(argv)
  setup_devices(args.workers, args.distributed)
  # Imported here: the examples build models (flax) and data on import.
  train = importlib.import_module(f"examples.{example}.train")
  default = importlib.import_module(f"examples.{example}.configs.default")
  config = dataclasses.replace(default.get_config(), **config_overrides(args))
  print(report(train.train_and_evaluate(config)), flush=True)
