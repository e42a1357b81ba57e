import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gptjax import config, model, sharding
from gptjax.config import MeshConfig
from gptjax.errors import UserError
from helpers import mesh_specs, tiny


def test_mesh_fills_minus_one_and_rejects_bad_shapes() -> None:
    assert jax.device_count() == 8
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(UserError, match="does not divide the 8 devices"):
        sharding.mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)
    with pytest.raises(UserError, match="needs 4 devices, but 8 are present"):
        sharding.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(UserError, match="not divisible by the 4 data-parallel"):
        sharding.check_batch(6, mesh)


def test_expected_partition_specs_of_a_full_size_preset() -> None:
    # Through eval_shape: the 175B model is never allocated.
    specs = mesh_specs(config.model_config("gpt3-175b"))
    block = specs["layers"]["block0"]
    assert specs["wte"] == P("tensor", "fsdp")
    assert specs["wpe"] == P(None, "fsdp")
    assert block["attn"]["qkv_kernel"] == P(None, "fsdp", None, "tensor", None)
    assert block["attn"]["out_kernel"] == P(None, "tensor", None, "fsdp")
    assert block["mlp"]["fc_kernel"] == P(None, "fsdp", "tensor")
    assert block["mlp"]["proj_kernel"] == P(None, "tensor", "fsdp")
    assert block["ln1"]["scale"] == P(None, "fsdp")
    # The leading axis of scanned params is the layer axis, never split.
    logical = sharding.param_specs(config.model_config("gpt3-175b"))
    assert logical["layers"]["block1"]["mlp"]["fc_kernel"] == P("layers", "embed", "mlp")


@pytest.mark.slow
def test_params_are_created_sharded_and_forward_matches_unsharded() -> None:
    cfg = tiny()
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = sharding.init_sharded_params(cfg, mesh, jax.random.key(0))
    fc = params["layers"]["block0"]["mlp"]["fc_kernel"]
    assert fc.sharding.spec == P(None, "fsdp", "tensor")
    # Each device holds a quarter of the kernel: fsdp and tensor both split it.
    assert fc.addressable_shards[0].data.shape == (2, 32 // 2, 64 // 2)
    ref_params = model.init_params(cfg, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-7)
    toks = jax.random.randint(jax.random.key(1), (8, cfg.context_length), 0, cfg.vocab_size)
    ref = model.GPT(cfg).apply({"params": ref_params}, toks)
    with sharding.activate(mesh):
        fwd = jax.jit(lambda p, t: model.GPT(cfg).apply({"params": p}, t))
        out = fwd(params, jax.device_put(toks, sharding.batch_sharding(mesh)))
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert jnp.isfinite(out).all()


def test_to_global_shards_over_batch_axes() -> None:
    # A process-local batch as the data iterators yield it: 8 rows of T tokens and weights.
    T = 16
    rng = np.random.default_rng(0)
    x = rng.integers(0, 257, (8, T + 1), dtype=np.int32)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:], "mask": np.ones((8, T), np.float32)}
    devices = np.array(jax.devices()[:8]).reshape(4, 2, 1)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    out = sharding.to_global(batch, mesh, stacked=False)
    for key, value in out.items():
        assert isinstance(value, jax.Array) and value.shape == (8, T)
        assert value.sharding.spec == P(("data", "fsdp"), None)
        assert value.sharding.shard_shape(value.shape) == (1, T)
        np.testing.assert_array_equal(np.asarray(value), batch[key])
    # Axes missing from the mesh are ignored; a batch that does not divide is a user error.
    mesh2 = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    assert sharding.to_global(batch, mesh2)["inputs"].sharding.spec == P(("data",), None)
    with pytest.raises(UserError, match="does not divide"):
        sharding.to_global({k: v[:6] for k, v in batch.items()}, mesh)
