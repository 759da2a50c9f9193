"""Reading real Orbax trajectories: the three layouts, mismatches, prefetch, laziness."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from slt_jax.trajectory.checkpoints import CheckpointTrajectory, list_steps

STEPS = (0, 10, 300)


def make_params(step):
    """Distinct parameters per step; a list node checks sequence handling."""
    base = float(step)
    return {
        "dense": {
            "kernel": jnp.arange(32.0).reshape(4, 8) + base,
            "bias": jnp.full((8,), base),
        },
        "out": [jnp.arange(3.0) * (base + 1.0)],
    }


def save(directory, steps, make_args, options=None):
    """Writes a trajectory the way a user would: async saves, then wait and close."""
    with ocp.CheckpointManager(directory, options=options) as manager:
        for step in steps:
            manager.save(step, args=make_args(step))
        manager.wait_until_finished()


def save_default(directory, steps=STEPS):
    save(directory, steps, lambda step: ocp.args.StandardSave(make_params(step)))


def save_composite(directory, steps=STEPS):
    save(
        directory,
        steps,
        lambda step: ocp.args.Composite(
            params=ocp.args.StandardSave(make_params(step)),
            opt_state=ocp.args.StandardSave({"mu": make_params(step), "count": jnp.int32(step)}),
        ),
    )


def save_train_state(directory, steps=STEPS):
    save(
        directory,
        steps,
        lambda step: ocp.args.StandardSave(
            {
                "params": make_params(step),
                "opt_state": (make_params(step + 1), make_params(step + 2)),
                "step": step,
            }
        ),
    )


def select_params(state):
    return state["params"]


def assert_params_equal(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert isinstance(got, jax.Array)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("slt_jax-checkpoint-prefetch")]


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize(
    "writer, options",
    [
        (save_default, {}),
        (save_composite, {"item": "params"}),
        (save_train_state, {"select": select_params}),
    ],
    ids=["default-item", "composite-item", "train-state-select"],
)
def test_round_trip_each_layout(tmp_path, writer, options, prefetch):
    writer(tmp_path / "ckpt")
    trajectory = CheckpointTrajectory(
        tmp_path / "ckpt", template=make_params(0), prefetch=prefetch, **options
    )
    assert len(trajectory) == len(STEPS)
    seen = []
    for step, params in trajectory:
        assert_params_equal(params, make_params(step))
        assert all(leaf.sharding == trajectory.sharding for leaf in jax.tree.leaves(params))
        seen.append(step)
    assert seen == list(STEPS)
    assert not prefetch_threads()


def test_list_steps_sorted_with_any_step_naming(tmp_path):
    # Numeric order differs from the names' lexicographic order ("300" < "40" < "5").
    save_default(tmp_path / "plain", steps=(5, 40, 300))
    assert list_steps(tmp_path / "plain") == [5, 40, 300]
    options = ocp.CheckpointManagerOptions(step_prefix="ckpt", step_format_fixed_length=6)
    save(
        tmp_path / "prefixed",
        (2, 7),
        lambda step: ocp.args.StandardSave(make_params(step)),
        options=options,
    )
    assert list_steps(tmp_path / "prefixed") == [2, 7]
    [(step, params)] = list(
        CheckpointTrajectory(tmp_path / "prefixed", template=make_params(0), steps=[7])
    )
    assert step == 7
    assert_params_equal(params, make_params(7))


def test_list_steps_names_a_missing_or_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="nowhere.*does not exist"):
        list_steps(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*holds no finished Orbax checkpoints"):
        list_steps(tmp_path / "empty")


def test_template_structure_is_kept(tmp_path):
    """Orbax restores tuples as lists; the reader hands back the template's containers."""
    def layers(step):
        return {"layers": (jnp.ones((2, 3)) * step, jnp.zeros(3) + step)}

    save(tmp_path / "ckpt", (1, 2), lambda step: ocp.args.StandardSave(layers(step)))
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), layers(0))
    for step, params in CheckpointTrajectory(tmp_path / "ckpt", template=template):
        assert isinstance(params["layers"], tuple)
        assert_params_equal(params, layers(step))


@pytest.mark.parametrize("prefetch", [True, False])
def test_shape_mismatch_names_step_and_path_and_is_lazy(tmp_path, prefetch):
    save_default(tmp_path / "ckpt", steps=(0, 10))
    wide = {"dense": {"kernel": jnp.zeros((4, 16)), "bias": jnp.zeros(8)}, "out": [jnp.zeros(3)]}
    save(tmp_path / "ckpt", (300,), lambda step: ocp.args.StandardSave(wide))
    iterator = iter(
        CheckpointTrajectory(tmp_path / "ckpt", template=make_params(0), prefetch=prefetch)
    )
    assert [next(iterator)[0], next(iterator)[0]] == [0, 10]
    message = (
        r"step 300: params\['dense'\]\['kernel'\] has shape \(4, 16\), "
        r"the model expects \(4, 8\)"
    )
    with pytest.raises(ValueError, match=message):
        next(iterator)
    assert not prefetch_threads()


def test_missing_extra_and_dtype_mismatches_in_one_error(tmp_path):
    save_default(tmp_path / "ckpt", steps=(5,))
    template = make_params(0)
    template["dense"]["scale"] = jnp.ones(8)
    template["out"] = [jnp.arange(3)]
    del template["dense"]["bias"]
    with pytest.raises(ValueError) as error:
        list(CheckpointTrajectory(tmp_path / "ckpt", template=template))
    message = str(error.value)
    assert message.startswith("step 5: ")
    assert "params['dense']['scale'] is missing from the checkpoint" in message
    assert "params['out'][0] has dtype float32, the model expects int32" in message
    assert "the checkpoint has params['dense']['bias'], which the model does not" in message


def test_item_and_select_errors_name_the_step(tmp_path):
    save_composite(tmp_path / "composite", steps=(3,))
    with pytest.raises(ValueError, match=r"step 3: .*named items \['opt_state', 'params'\]"):
        list(CheckpointTrajectory(tmp_path / "composite", template=make_params(0)))
    with pytest.raises(ValueError, match=r"step 3: .*has no item 'w'"):
        list(CheckpointTrajectory(tmp_path / "composite", template=make_params(0), item="w"))
    save_train_state(tmp_path / "state", steps=(4,))
    expected = r"step 4: select failed .*KeyError.*'opt_state', 'params'"
    with pytest.raises(ValueError, match=expected):
        list(
            CheckpointTrajectory(
                tmp_path / "state", template=make_params(0), select=lambda s: s["weights"]
            )
        )
    save(
        tmp_path / "strings",
        (1,),
        lambda step: ocp.args.PyTreeSave({"params": make_params(step), "run": "a"}),
    )
    with pytest.raises(ValueError, match=r"step 1: item\['run'\] is not an array"):
        list(
            CheckpointTrajectory(
                tmp_path / "strings", template=make_params(0), select=select_params
            )
        )
    with pytest.raises(ValueError, match=r"steps \[7\] are not finished checkpoints"):
        CheckpointTrajectory(tmp_path / "state", template=make_params(0), steps=[4, 7])


def test_prefetch_matches_sequential_and_stops_its_thread(tmp_path):
    save_train_state(tmp_path / "ckpt")
    kwargs = {"template": make_params(0), "select": select_params}
    with_prefetch = list(CheckpointTrajectory(tmp_path / "ckpt", prefetch=True, **kwargs))
    without = list(CheckpointTrajectory(tmp_path / "ckpt", prefetch=False, **kwargs))
    assert [s for s, _ in with_prefetch] == [s for s, _ in without] == list(STEPS)
    for (_, a), (_, b) in zip(with_prefetch, without):
        assert_params_equal(a, b)
    iterator = iter(CheckpointTrajectory(tmp_path / "ckpt", prefetch=True, **kwargs))
    next(iterator)
    assert len(prefetch_threads()) == 1
    iterator.close()
    assert not prefetch_threads()


def test_explicit_sharding_and_steps_subset(tmp_path):
    save_default(tmp_path / "ckpt")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("chains",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    trajectory = CheckpointTrajectory(
        tmp_path / "ckpt", template=make_params(0), steps=[300, 0], sharding=sharding
    )
    steps = []
    for step, params in trajectory:
        steps.append(step)
        assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(params))
    assert steps == [300, 0]
    def to_host(params):
        return jax.tree.map(np.asarray, params)

    for _, params in CheckpointTrajectory(
        tmp_path / "ckpt", template=make_params(0), select=to_host, sharding=sharding
    ):
        assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))
        assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(params))
    with pytest.raises(ValueError, match="sharding must be a jax.sharding.Sharding"):
        CheckpointTrajectory(tmp_path / "ckpt", template=make_params(0), sharding="cpu")


def test_reading_leaves_the_directory_untouched(tmp_path):
    save_composite(tmp_path / "ckpt")

    def snapshot():
        return sorted(
            (str(p.relative_to(tmp_path)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in (tmp_path / "ckpt").rglob("*")
        )

    before = snapshot()
    list(CheckpointTrajectory(tmp_path / "ckpt", template=make_params(0), item="params"))
    assert snapshot() == before
