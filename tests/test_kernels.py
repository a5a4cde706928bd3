"""C kernels vs the numpy reference implementation (lcls_dl.ingest.kernels)."""
import numpy as np
import pytest

from lcls_dl.ingest import kernels as K

NUMPY = K.NumpyKernels()
try:
    C = K.get_kernels("c")
except OSError:  # extension not built: parity tests are skipped, the fallback is still tested
    C = None
needs_c = pytest.mark.skipif(C is None, reason="lcls_dl._kernels not built")

DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.float32, np.float64]


def _bins(rng, n, n_bins, masked=0.2, run=1):
    """Random bins, in runs of ``run`` equal values (detector rows look like runs of ~10)."""
    bins = np.repeat(rng.integers(0, n_bins, n // run + 1), run)[:n].astype(np.int32)
    bins[np.repeat(rng.random(n // run + 1) < masked, run)[:n]] = -1
    return bins


def _frame(rng, n, dtype):
    hi = 100 if np.dtype(dtype).itemsize == 1 else 3000
    lo = -50 if np.issubdtype(dtype, np.signedinteger) or np.issubdtype(dtype, np.floating) else 0
    x = rng.integers(lo, hi, n)
    if np.issubdtype(dtype, np.floating):
        x = x + rng.random(n)
    return x.astype(dtype)


def _lit_pixels(acc, frame, bins, offset, scale, hot, cand_thr):
    """Lit pixels found in the spans, checking that spans are well formed."""
    v = K.photons(frame, offset, scale)
    starts, lengths = acc.span_start.astype(np.int64), acc.span_len.astype(np.int64)
    assert np.all(lengths >= 1) and np.all(starts[1:] >= starts[:-1] + lengths[:-1])
    pixels = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)] or [[]]).astype(np.int64)
    with np.errstate(invalid="ignore"):
        ok = (bins[pixels] >= 0) & np.isfinite(v[pixels]) & (v[pixels] <= hot)
    for s, n, m in zip(starts, lengths, acc.span_max):  # one bin per span, max of included
        assert np.all(bins[s:s + n] == bins[s])
        with np.errstate(invalid="ignore"):
            inc = v[s:s + n][np.isfinite(v[s:s + n]) & (v[s:s + n] <= hot)]
        assert m == inc.max()
    with np.errstate(invalid="ignore"):
        return pixels[ok & (v[pixels] > cand_thr)]


def _assert_acc_equal(a, b, frame, bins, offset, scale, hot, cand_thr):
    np.testing.assert_allclose(a.sum, b.sum, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(a.sumsq, b.sumsq, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(a.excluded, b.excluded)
    np.testing.assert_array_equal(a.binmax, b.binmax)  # exact: max of the same doubles
    lit_a = _lit_pixels(a, frame, bins, offset, scale, hot, cand_thr)
    lit_b = _lit_pixels(b, frame, bins, offset, scale, hot, cand_thr)
    np.testing.assert_array_equal(lit_a, lit_b)
    assert a.n_lit == b.n_lit == lit_b.size
    assert a.vmax == b.vmax
    assert a.n_nonfinite == b.n_nonfinite


@needs_c
@pytest.mark.parametrize("run", [1, 2, 11])
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_parity_scalar_offset(dtype, run):
    rng = np.random.default_rng(1)
    n, n_bins = 10_003, 37  # odd sizes exercise the loops' tails
    frame, bins = _frame(rng, n, dtype), _bins(rng, n, n_bins, run=run)
    top = (float(frame.max()) - 3.0) * 0.25
    args = (bins, n_bins, 3.0, 0.25, 0.9 * top, 0.6 * top)  # offset, scale, hot, cand_thr
    ref = NUMPY.accumulate(frame, *args)
    got = C.accumulate(frame, *args, C.workspace(bins, n_bins))
    _assert_acc_equal(got, ref, frame, bins, 3.0, 0.25, args[4], args[5])
    assert ref.excluded.sum() > 0 and ref.n_lit > 0  # the test covers both paths


@needs_c
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_accumulate_parity_per_pixel_dark_and_gain(dtype):
    rng = np.random.default_rng(2)
    n, n_bins = 4_097, 16
    frame, bins = _frame(rng, n, dtype), _bins(rng, n, n_bins, run=5)
    offset = rng.normal(20, 5, n).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    for off, sc in [(offset, 1.0), (2.0, scale), (offset, scale)]:
        ref = NUMPY.accumulate(frame, bins, n_bins, off, sc, np.inf, 1000.0)
        got = C.accumulate(frame, bins, n_bins, off, sc, np.inf, 1000.0)
        _assert_acc_equal(got, ref, frame, bins, off, sc, np.inf, 1000.0)


@pytest.mark.parametrize("kern", ["numpy", pytest.param("c", marks=needs_c)])
def test_accumulate_counts_nonfinite_only_in_used_pixels(kern):
    k = K.get_kernels(kern)
    frame = np.arange(12, dtype=np.float32)
    bins = np.array([0, 0, 1, 1, -1, -1, 2, 2, 2, 0, 1, 2], np.int32)
    frame[[0, 6]] = np.nan
    frame[7] = np.inf
    frame[10] = -np.inf
    frame[4] = np.nan  # masked: ignored
    acc = k.accumulate(frame, bins, 3, 0.0, 1.0, np.inf, 5.0)
    np.testing.assert_array_equal(acc.binmax, [9.0, 3.0, 11.0])  # finite pixels only
    assert acc.n_nonfinite == 4
    np.testing.assert_array_equal(acc.excluded, [1, 1, 2])
    np.testing.assert_allclose(acc.sum, [1 + 9, 2 + 3, 8 + 11])
    np.testing.assert_array_equal(_lit_pixels(acc, frame, bins, 0.0, 1.0, np.inf, 5.0), [8, 9, 11])
    assert acc.n_lit == 3
    assert acc.vmax == 11


def _peak_scene(rng, block_shape, dtype=np.float32):
    """Low background, planted blobs of several sizes, some touching block edges."""
    n_mod, ny, nx = block_shape
    img = rng.poisson(1.0, block_shape).astype(np.float64)
    sizes = []
    for m in range(n_mod):
        for _ in range(6):
            h, w = rng.integers(1, 7, 2)
            y, x = rng.integers(0, ny - h), rng.integers(0, nx - w)
            img[m, y:y + h, x:x + w] += rng.uniform(30, 80)
            sizes.append(h * w)
    # a diagonal pair: one component with 8-connectivity, two singles with 4
    img[0, 2, 2] += 60
    img[0, 3, 3] += 60
    return img.astype(dtype).reshape(-1)


@needs_c
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("dtype", [np.uint16, np.float64])
@pytest.mark.parametrize("with_panels", [False, True])
def test_find_peaks_parity(connectivity, dtype, with_panels):
    rng = np.random.default_rng(3)
    block_shape = (3, 40, 50)
    frame = _peak_scene(rng, block_shape, dtype)
    n = frame.size
    bins = (np.arange(n) % 7).astype(np.int32)
    bins[rng.random(n) < 0.05] = -1
    thr = np.full(7, 10.0)
    thr[3] = 25.0
    bg = np.linspace(0.5, 1.5, 7)
    panel = None
    if with_panels:  # split each block into left/right halves
        panel = np.broadcast_to((np.arange(50) >= 25).astype(np.int32), block_shape).copy().reshape(-1)
    acc = C.accumulate(frame, bins, 7, 0.0, 1.0, np.inf, 10.0)
    args = (frame, block_shape, bins, 0.0, 1.0, np.inf, thr, bg, panel, connectivity, 2, 30)
    ref = NUMPY.find_peaks(*args, acc)
    ws = C.workspace(bins, 7)
    got = C.find_peaks(*args, acc, ws)
    assert got[0] == ref[0] and got[2] == ref[2]
    assert got[1] == pytest.approx(ref[1], rel=1e-12)
    assert ref[0] > 5
    assert not ws.visited.any()  # scratch left clean for the next frame
    assert C.find_peaks(*args, acc, ws) == got


@pytest.mark.parametrize("kern", ["numpy", pytest.param("c", marks=needs_c)])
def test_find_peaks_known_components(kern):
    k = K.get_kernels(kern)
    img = np.zeros((2, 10, 12), np.uint16)
    img[0, 1, 1] = 50                      # 1 px: too small
    img[0, 4:6, 4:7] = 50                  # 6 px: counted
    img[0, 7, :] = 50                      # 12 px: too large for max 10
    img[0, 0, 10], img[0, 1, 11] = 50, 50  # diagonal pair: one peak with 8-connectivity only
    img[0, 9, 0:2] = 50                    # 2 px at the bottom of block 0 and 4 px at the
    img[1, 0:2, 0:2] = 50                  # top of block 1: adjacent in memory, never joined
    flat = img.reshape(-1)
    bins = np.zeros(flat.size, np.int32)
    thr, bg = np.array([10.0]), np.array([1.0])
    acc = k.accumulate(flat, bins, 1, 0.0, 1.0, np.inf, 10.0)
    args = (flat, img.shape, bins, 0.0, 1.0, np.inf, thr, bg, None)
    n8, photons8, pixels8 = k.find_peaks(*args, 8, 2, 10, acc)
    n4, _, pixels4 = k.find_peaks(*args, 4, 2, 10, acc)
    assert n8 == 4 and n4 == 3
    assert photons8 == pytest.approx(49.0 * (6 + 2 + 2 + 4))
    assert pixels8 == pixels4 == 1 + 6 + 12 + 2 + 2 + 4


def test_as_kernel_input_views_and_conversions():
    a = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    assert np.shares_memory(K.as_kernel_input(a), a)
    be = a.astype(">u2")
    out = K.as_kernel_input(be)
    assert out.dtype == np.float64 and np.array_equal(out, a.reshape(-1))
    assert K.as_kernel_input(a.astype(np.int64)).dtype == np.float64
    assert K.as_kernel_input(a[:, :, ::2]).flags.c_contiguous


def test_env_forces_numpy(monkeypatch):
    monkeypatch.setenv("LCLS_DL_KERNELS", "numpy")
    assert K.get_kernels().name == "numpy"
    monkeypatch.setenv("LCLS_DL_KERNELS", "fortran")
    with pytest.raises(ValueError):
        K.get_kernels()


def test_fallback_warns_once_when_extension_missing(monkeypatch):
    monkeypatch.setattr(K, "_extension_path", lambda: None)
    monkeypatch.setattr(K, "_CACHE", {})
    monkeypatch.delenv("LCLS_DL_KERNELS", raising=False)
    with pytest.warns(K.KernelFallbackWarning) as record:
        first = K.get_kernels()
        second = K.get_kernels()
    assert first is second and first.name == "numpy"
    assert len(record) == 1
    with pytest.raises(OSError):
        K.get_kernels("c")


@needs_c
@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (100.5, 0.1)])
def test_accumulate_parity_uint16_full_range_long_runs(offset, scale):
    """uint16 takes a 16-pixel SIMD path: full value range, runs longer than 16, frame end."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 41, 400)
    bins = np.repeat(rng.integers(-1, 23, lengths.size), lengths).astype(np.int32)
    bins[-5:] = 4  # a run that ends at the last pixel
    n = bins.size
    frame = rng.integers(0, 65536, n).astype(np.uint16)
    frame[rng.random(n) < 0.3] = 0
    frame[:50] = 65535
    top = (65535 - offset) * scale
    for hot, cand in [(np.inf, 0.5 * top), (0.8 * top, 0.6 * top), (np.inf, np.inf)]:
        ref = NUMPY.accumulate(frame, bins, 23, offset, scale, hot, cand)
        got = C.accumulate(frame, bins, 23, offset, scale, hot, cand)
        _assert_acc_equal(got, ref, frame, bins, offset, scale, hot, cand)
