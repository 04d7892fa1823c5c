"""kernels/numba_random.py: NumPy's Generator.permutation for PCG64, compiled, bit for bit."""

import numpy as np
import pytest

pytest.importorskip("numba")
from numba import njit  # noqa: E402

from fastbp.kernels import numba_random as R  # noqa: E402

_M64 = (1 << 64) - 1


@pytest.mark.parametrize("seed", range(4))
def test_permutation_equals_numpy_s_and_leaves_the_same_state(seed):
    sizes = list(range(0, 70)) + [255, 256, 257, 1000, 4000, 65537, 100_000]
    for n in sizes:
        ours, theirs = np.random.default_rng(seed), np.random.default_rng(seed)
        if seed % 2:  # a buffered half of a 64-bit output in the state (has_uint32 = 1)
            for g in (ours, theirs):
                g.integers(0, 7, dtype=np.uint32)
            assert theirs.bit_generator.state["has_uint32"] == 1
        state = R.pcg64_state(ours)
        out = np.empty(n, np.int64)
        R.permutation_into(state, out)
        ours.bit_generator.state = R.pcg64_state_dict(state)
        np.testing.assert_array_equal(out, theirs.permutation(n))
        assert ours.bit_generator.state == theirs.bit_generator.state
        np.testing.assert_array_equal(ours.permutation(9), theirs.permutation(9))  # and the stream goes on alike


def test_the_state_round_trips_and_other_bit_generators_are_declined():
    g = np.random.default_rng(123)
    g.random(3)
    assert R.pcg64_state_dict(R.pcg64_state(g)) == g.bit_generator.state
    assert R.pcg64_state(np.random.Generator(np.random.MT19937(1))) is None
    assert R.pcg64_state(np.random.Generator(np.random.PCG64DXSM(1))) is None


def _reference_next64(state):
    """PCG64 in Python integers: the step, then XSL-RR of the new state."""
    s = (state[0] * R.PCG64_MULTIPLIER + state[1]) & ((1 << 128) - 1)
    state[0] = s
    x, rot = ((s >> 64) ^ s) & _M64, s >> 122
    return ((x >> rot) | (x << (64 - rot))) & _M64


def test_intervals_above_32_bits_draw_whole_64_bit_outputs():
    """random_interval beyond 2^32 - 1 (no array that long to permute here): against PCG64 and
    NumPy's rejection rule written out in Python integers."""
    @njit
    def draws(rs, top, k):
        out = np.empty(k, np.int64)
        for i in range(k):
            out[i] = R.random_interval(rs, top)
        return out

    g = np.random.default_rng(5)
    rs = R.pcg64_state(g)
    d = g.bit_generator.state["state"]
    ref = [d["state"], d["inc"]]
    for top in (2**32, 3 * 2**33 + 5, 2**62 + 1):
        got = draws(rs, top, 200)
        mask = (1 << top.bit_length()) - 1
        want = []
        while len(want) < 200:
            v = _reference_next64(ref) & mask
            if v <= top:
                want.append(v)
        assert got.tolist() == want
        assert (int(rs[0]) << 64 | int(rs[1])) == ref[0]
