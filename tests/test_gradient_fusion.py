"""Zero-copy gradient fusion: plan round trip, in-place views, aliasing guards."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from lcls_dl.distributed.gradient_fusion import FusionPlan, TensorReducer, host_view  # noqa: E402


class DoublingWorld:
    """Stands in for two ranks holding the same values: the sum doubles every buffer."""

    def __init__(self):
        self.calls = []

    def allreduce_sum_inplace(self, buffers):
        self.calls.append([b.shape for b in buffers])
        for b in buffers:
            np.multiply(b, 2, out=b)


SHAPES = [(3, 3, 1, 4), (4,), (300, 50), (50,), (2000, 600), (600,)]


def _grads(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def test_plan_fuses_small_and_round_trips_in_a_compiled_step():
    plan = FusionPlan(SHAPES, fuse_below=1 << 20)
    assert plan.fused == [0, 1, 2, 3, 5] and plan.direct == [4] and plan.n_buffers == 2
    grads = _grads()

    @tf.function
    def round_trip(*gs):
        return plan.unfuse(plan.fuse(list(gs)))

    out = round_trip(*[tf.constant(g) for g in grads])
    for o, g in zip(out, grads):
        np.testing.assert_array_equal(o.numpy(), g)
    # one small tensor alone is not worth a concatenation; float64 never fused
    assert FusionPlan([(4,), (5000, 500)], fuse_below=1 << 20).fused == []
    assert FusionPlan([(4,), (5,)], ["float64", "float32"]).fused == []


def test_host_view_aliases_the_tensor_and_refuses_non_float():
    t = tf.function(lambda x: x * 2.0)(tf.ones((4, 5)))
    v = host_view(t)
    assert v is not None and v.flags.writeable and v.shape == (4, 5)
    v[1, 2] = 42.0
    assert float(t[1, 2]) == 42.0
    assert host_view(tf.constant([1, 2, 3])) is None


def test_reducer_sums_in_place_and_guards_shared_memory():
    world = DoublingWorld()
    plan = FusionPlan(SHAPES, fuse_below=1 << 20)
    grads = _grads(1)
    step = tf.function(lambda *gs: plan.fuse([g * 1.0 for g in gs]))
    bufs = step(*[tf.constant(g) for g in grads])
    out = TensorReducer(world)(bufs)
    assert all(o is b for o, b in zip(out, bufs))  # reduced in their own memory
    back = tf.function(lambda *b: plan.unfuse(list(b)))(*out)
    for o, g in zip(back, grads):
        np.testing.assert_array_equal(o.numpy(), 2 * g)

    # the same tensor twice: each result is one sum, not a sum of a sum
    t = tf.function(lambda x: x + 1.0)(tf.zeros(8))
    a, b = TensorReducer(world)([t, t])
    np.testing.assert_array_equal(a.numpy(), np.full(8, 2.0))
    np.testing.assert_array_equal(b.numpy(), np.full(8, 2.0))
    np.testing.assert_array_equal(t.numpy(), np.ones(8))

    # a tensor sharing a protected variable's buffer is reduced through a copy
    var = tf.Variable(np.arange(6, dtype=np.float32))
    read = tf.convert_to_tensor(var)
    (r,) = TensorReducer(world, protect=[var])([read])
    np.testing.assert_array_equal(r.numpy(), 2 * np.arange(6))
    np.testing.assert_array_equal(var.numpy(), np.arange(6))


def test_reducer_later_calls_still_sum_once_and_guard_overlap():
    """After the first call checked the step, later calls take views directly: every
    call must still sum each buffer once, and outputs that share memory on a later
    call (not on the first) must still go through a copy."""
    world = DoublingWorld()
    step = tf.function(lambda x, y: [x * 1.0, y + 0.0])
    reducer = TensorReducer(world)
    for k in range(3):
        a, b = reducer(step(tf.fill([5], float(k)), tf.fill([7], 1.0 + k)))
        np.testing.assert_array_equal(a.numpy(), np.full(5, 2.0 * k))
        np.testing.assert_array_equal(b.numpy(), np.full(7, 2.0 * (1 + k)))
    t = tf.function(lambda x: x + 1.0)(tf.zeros(8))
    a, b = reducer([t, t])
    np.testing.assert_array_equal(a.numpy(), np.full(8, 2.0))
    np.testing.assert_array_equal(b.numpy(), np.full(8, 2.0))
    np.testing.assert_array_equal(t.numpy(), np.ones(8))
    assert len(world.calls) == 4
    # more outputs than the pairwise check covers: the address-span check
    five = tf.function(lambda x: [x + float(i) for i in range(5)])
    many = TensorReducer(world)
    out = many(five(tf.zeros(3)))
    assert [float(o[0]) for o in out] == [0.0, 2.0, 4.0, 6.0, 8.0]
    ts = five(tf.zeros(3))
    out = many([ts[0], ts[1], ts[2], ts[3], ts[1]])
    assert [float(o[0]) for o in out] == [0.0, 2.0, 4.0, 6.0, 2.0]
