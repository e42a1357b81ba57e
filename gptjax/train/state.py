"""The train state and the pure functions over it: the train and eval steps, the state's
abstract shape and shardings, its initialization, and the jitted step the loop runs.

Everything is a global jax.Array on a mesh; the step is jitted once per batch shape.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from gptjax import sharding
from gptjax.config import Config, ModelConfig
from gptjax.lora import adapters as lora_lib
from gptjax.lora.adapters import LoraSpec
from gptjax.model.losses import sum_loss
from gptjax.model import param_shapes


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # steps taken, skipped ones included (each consumed its batch)
    params: Any
    opt_state: Any
    bad_streak: jax.Array  # consecutive non-finite steps

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> TrainState:
        """Step 0 of `params` with a fresh optimizer state, on whatever devices `params` are
        (the trainer builds its state sharded instead: `init_state`)."""
        return cls(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                   bad_streak=jnp.int32(0))


def train_step(state: TrainState, batch: dict[str, jax.Array], lr: jax.Array, base: Any = None,
               *, model_cfg: ModelConfig, tx: optax.GradientTransformation,
               lora: LoraSpec | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over batch [n_micro, B, T], gradients accumulated over the microbatches.

    With `lora`, state.params are the adapters and `base` the frozen weights they adapt: only
    the adapters have gradients and optimizer state. A step whose loss or gradient norm is not
    finite leaves params and optimizer state unchanged.
    """
    def loss(trainable: Any, mb: dict[str, jax.Array], i: jax.Array) -> Any:
        if lora is None:
            return sum_loss(trainable, model_cfg, mb)
        # Dropout masks are a function of the step and microbatch: a resumed run draws the same.
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(lora.seed), state.step), i)
        return sum_loss(lora_lib.attach(base, trainable, lora), model_cfg, mb,
                        lora_dropout=lora.dropout, rng=rng)

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def micro(carry: Any, xs: tuple[dict[str, jax.Array], jax.Array]) -> tuple[Any, None]:
        g_acc, nll_acc, n_acc = carry
        (nll, n), g = grad_fn(state.params, *xs)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (g_acc, nll_acc + nll, n_acc + n), None

    if jax.tree.leaves(batch)[0].shape[0] == 1:
        # One microbatch: no accumulator to zero and add into, no loop around the step.
        (nll, count), grads = grad_fn(state.params, jax.tree.map(lambda a: a[0], batch), 0)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    else:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        (grads, nll, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0),
                                              (batch, jnp.arange(n_micro)))
    count = jnp.maximum(count, 1.0)
    # Sum of per-token gradients / tokens: k microbatches equal one batch k times as large.
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = nll / count
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        bad_streak=jnp.where(ok, 0, state.bad_streak + 1),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": ~ok,
               "bad_streak": new_state.bad_streak}
    return new_state, metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, model_cfg: ModelConfig
              ) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, tokens) over one [B, T] batch; rows with mask 0 are padding."""
    return sum_loss(params, model_cfg, batch)


def batch_abstract(mesh: Mesh, n_micro: int, micro: int, T: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and shardings of a train batch of n_micro microbatches (for compiling ahead)."""
    sh = sharding.batch_sharding(mesh, 3, stacked=True)
    return {k: jax.ShapeDtypeStruct((n_micro, micro, T), dt, sharding=sh)
            for k, dt in (("inputs", jnp.int32), ("targets", jnp.int32), ("mask", jnp.float32))}


def jit_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                   state_sh: TrainState, lora: LoraSpec | None = None, base_sh: Any = None
                   ) -> Any:
    """train_step jitted as the loop runs it: (state, stacked batch, lr, base) -> (state,
    metrics), the state donated and kept in its shardings; base (LoRA's frozen weights, else
    None) is read, never donated."""
    return jax.jit(
        functools.partial(train_step, model_cfg=model_cfg, tx=tx, lora=lora),
        in_shardings=(state_sh, sharding.batch_sharding(mesh, 3, stacked=True), None, base_sh),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )


def compile_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                       state_sh: TrainState, state: Any, batch: Any,
                       lora: LoraSpec | None = None, base: Any = None) -> Any:
    """jit_train_step compiled ahead of time for these (abstract or concrete) arguments. Call it
    inside sharding.activate(mesh)."""
    base_sh = None if base is None else jax.tree.map(lambda a: a.sharding, base)
    return jit_train_step(model_cfg, tx, mesh, state_sh, lora, base_sh).lower(
        state, batch, jax.ShapeDtypeStruct((), jnp.float32), base).compile()


def jit_eval_step(model_cfg: ModelConfig, mesh: Mesh, params_sh: Any) -> Any:
    """eval_step jitted: (params, [B, T] batch) -> (sum of losses, tokens)."""
    return jax.jit(functools.partial(eval_step, model_cfg=model_cfg),
                   in_shardings=(params_sh, sharding.batch_sharding(mesh, 2)))


def abstract_params(cfg: Config, mesh: Mesh) -> tuple[Any, Any]:
    """(the model's parameters as ShapeDtypeStructs with shardings, their shardings)."""
    p_sh = sharding.param_shardings(cfg.model, mesh)
    p_abs = param_shapes(cfg.model)
    return sharding.with_shardings(p_abs, p_sh), p_sh


def abstract_state(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation
                   ) -> tuple[TrainState, TrainState]:
    """(abstract state with shardings, state shardings), allocating nothing. Under LoRA
    (train.lora_rank > 0) the state's params are the adapters, sharded as their base kernels."""
    p_abs, p_sh = abstract_params(cfg, mesh)
    spec = LoraSpec.of(cfg.train)
    if spec is not None:
        p_sh = lora_lib.shardings(p_sh, p_abs, spec)
        p_abs = sharding.with_shardings(lora_lib.shapes(p_abs, spec), p_sh)
    rep = sharding.replicated(mesh)
    o_abs = jax.eval_shape(tx.init, p_abs)
    o_sh = opt_state_shardings(o_abs, p_abs, rep)
    o_abs = sharding.with_shardings(o_abs, o_sh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    abs_state = TrainState(step=scalar, params=p_abs, opt_state=o_abs, bad_streak=scalar)
    shardings = TrainState(step=rep, params=p_sh, opt_state=o_sh, bad_streak=rep)
    return abs_state, shardings


def opt_state_shardings(opt_abs: Any, params_abs: Any, default: NamedSharding) -> Any:
    """Adam's moments mirror the parameter tree: each leaf whose path ends with a parameter's
    path (and has its shape) takes that parameter's sharding; counters are replicated.
    (XLA does not propagate shardings into zeros_like, so this must be explicit.)"""
    by_path = {
        tuple(str(k) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params_abs)
    }

    def pick(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        keys = tuple(str(k) for k in path)
        for i in range(len(keys)):
            p = by_path.get(keys[i:])
            if p is not None and p.shape == leaf.shape:
                return p.sharding
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_abs)


def init_state(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation, shardings: TrainState,
               params: Any = None, step: int = 0) -> TrainState:
    """A fresh optimizer state (from `params`, or freshly initialized ones: under LoRA, fresh
    adapters) at `step`."""
    spec = LoraSpec.of(cfg.train)
    if params is None and spec is not None:
        base_abs = abstract_params(cfg, mesh)[0]
        params = jax.jit(lambda k: lora_lib.init(k, base_abs, spec),
                         out_shardings=shardings.params)(jax.random.key(cfg.train.seed))
    elif params is None:
        params = sharding.init_sharded_params(cfg.model, mesh, jax.random.key(cfg.train.seed))
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return state_at(step, params, opt_state, shardings)


def state_at(step: int, params: Any, opt_state: Any, shardings: TrainState) -> TrainState:
    """A TrainState of existing parameters and optimizer state at `step`, no bad steps."""
    # Two distinct buffers: the state is donated, and one buffer cannot be donated twice.
    return TrainState(step=jax.device_put(jnp.int32(step), shardings.step), params=params,
                      opt_state=opt_state,
                      bad_streak=jax.device_put(jnp.int32(0), shardings.bad_streak))
