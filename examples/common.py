"""Pieces shared by the examples: compressors, the data-parallel step, logs."""

from collections.abc import Callable, Iterable
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import tqdm

import gqsgd_jax

AXIS = "data"
COMPRESSORS = ("f32", "bf16", "gqsgd", "gqsgd_exp")


def request_cpu_devices(n: int) -> None:
  """Asks for at least ``n`` simulated CPU devices, before JAX starts.

  On a GPU host this only sizes the unused CPU client, so the examples run on
  the real GPUs. A larger earlier request (e.g. the library's test set-up)
  is kept; once a backend is up the devices that exist are used.
  """
  if jax.config.jax_num_cpu_devices >= n:
    return
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # a backend already started
    pass


def make_mesh(num_workers: int) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over the first ``num_workers`` devices."""
  devices = jax.devices()
  if num_workers > len(devices):
    raise ValueError(
        f"asked for {num_workers} workers but JAX sees {len(devices)} "
        f"{jax.default_backend()} devices")
  return jax.make_mesh((num_workers,), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:num_workers])


def make_compressor(name: str, bits: int = 4, *, axis_name=AXIS,
                    seed: int = 0, reduction: str = "auto"
                    ) -> optax.GradientTransformation:
  """The gradient all-reduce of a method, as the first link of a chain.

  Args:
    name: "f32" or "bf16" (float psum baselines), "gqsgd" (Global-QSGD,
      standard dithering, ``bits`` per coordinate) or "gqsgd_exp"
      (exponential dithering, always 8-bit sign + exponent codes).
    bits: bits per coordinate for "gqsgd"; ignored by the others.
    axis_name: the data-parallel mesh axis.
    seed: seed of the quantizer's dither.
    reduction: "auto", "psum" or "butterfly" for "gqsgd" (see
      ``gqsgd_jax.global_quantize``); ignored by the others.

  Returns:
    A transform that turns local gradients into the workers' mean gradient.
  """
  if name == "f32":
    return gqsgd_jax.psum_mean(axis_name=axis_name)
  if name == "bf16":
    return gqsgd_jax.psum_mean(axis_name=axis_name, wire_dtype=jnp.bfloat16)
  if name == "gqsgd":
    return gqsgd_jax.global_quantize(bits=bits, axis_name=axis_name,
                                     reduction=reduction, key=seed)
  if name == "gqsgd_exp":
    return gqsgd_jax.global_quantize(bits=8, axis_name=axis_name,
                                     dithering="exponential", key=seed)
  raise ValueError(f"compressor must be one of {COMPRESSORS}, got {name!r}")


def method_name(name: str, bits: int) -> str:
  """A readable label for logs, tables and plots."""
  return {"gqsgd": f"gqsgd-{bits}bit", "gqsgd_exp": "gqsgd-exp-8bit"}.get(
      name, name)


def replicate(tree, mesh):
  """Puts a pytree on every device of ``mesh`` (params, optimizer state)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard(tree, mesh):
  """Splits a pytree of host arrays along axis 0 over the mesh's devices."""
  return jax.device_put(tree, NamedSharding(mesh, P(AXIS)))


LossFn = Callable[[Any, Any], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh):
  """A jitted data-parallel step ``(params, opt_state, batch) -> ...``.

  ``loss_fn(params, local_batch) -> (loss, metrics)`` sees one device's
  shard. Params and optimizer state are plain pytrees, replicated; the batch
  is sharded along axis 0. The step returns the new params and state, and
  each device's loss and metrics stacked along a leading axis (average them
  on the host: reducing them in the step would add a collective).

  The step works on pytrees and calls ``tx.update`` itself rather than going
  through ``nnx.Optimizer``: that is the pattern the library documents, it
  shows exactly where local gradients become the mean gradient, and it keeps
  NNX's in-place module updates out of the shard_map.
  """

  def step(params, opt_state, batch):
    # Differentiating w.r.t. varying(params) keeps gradients local: w.r.t.
    # replicated params, JAX would all-reduce them in f32 by itself.
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(gqsgd_jax.varying(params, AXIS), batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = jax.tree.map(lambda m: jnp.reshape(m, (1,)),
                           {"loss": loss, **metrics})
    return params, opt_state, metrics

  # check_vma=True (the default) makes shard_map track which values differ
  # across devices: that is what lets varying() keep gradients local, and it
  # checks that the updated params really are replicated (out_specs=P()).
  return jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P(AXIS)),
      out_specs=(P(), P(), P(AXIS))))


def make_eval_step(metric_fn: Callable[[Any, Any], dict],
                   mesh: jax.sharding.Mesh):
  """A jitted ``(params, batch) -> per-device metric sums`` over the mesh."""

  def step(params, batch):
    return jax.tree.map(lambda m: jnp.reshape(m, (1,)),
                        metric_fn(params, batch))

  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)),
                               out_specs=P(AXIS)))


def wire_summary(compiled) -> dict:
  """Collective bytes per step and device of a compiled step, as a dict."""
  report = gqsgd_jax.wire_report(compiled)
  return {
      "payload_bytes": report.payload_bytes,
      "scalar_bytes": report.scalar_bytes,
      "float_payload_bytes": report.float_payload_bytes,
      "total_bytes": report.total_bytes,
      "sent_bytes": report.sent_bytes,
      "by_op": report.by_op,
  }


def num_elements(tree) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64)
                 for x in jax.tree.leaves(tree)))


def progress(iterable: Iterable, *, total: int, desc: str,
             enabled: bool = True):
  """A tqdm bar; off when disabled and when stderr is not a terminal."""
  # disable=None: tqdm turns itself off on a non-TTY (CI logs, pipes).
  return tqdm.tqdm(iterable, total=total, desc=desc,
                   disable=None if enabled else True, dynamic_ncols=True,
                   leave=False)


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
