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


def _assert_profile_equal(got, ref, acc=None):
    np.testing.assert_allclose(got.sum, ref.sum, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(got.excluded, ref.excluded)
    assert got.n_nonfinite == ref.n_nonfinite
    if acc is not None:  # the fused pass reports the same sums and exclusions
        np.testing.assert_allclose(got.sum, acc.sum, rtol=1e-12, atol=1e-9)
        np.testing.assert_array_equal(got.excluded, acc.excluded)
        assert got.n_nonfinite == acc.n_nonfinite


@needs_c
@pytest.mark.parametrize("run", [1, 11, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_profile_accumulate_parity_scalar_offset(dtype, run):
    rng = np.random.default_rng(11)
    n, n_bins = 10_003, 37
    frame, bins = _frame(rng, n, dtype), _bins(rng, n, n_bins, run=run)
    hot = (float(frame.max()) - 3.0) * 0.25 * 0.9
    for h in (hot, np.inf):
        args = (bins, n_bins, 3.0, 0.25, h)
        ref = NUMPY.profile_accumulate(frame, *args)
        got = C.profile_accumulate(frame, *args, C.workspace(bins, n_bins))
        _assert_profile_equal(got, ref, NUMPY.accumulate(frame, *args, 1.0))
    assert ref.sum.any() and not ref.excluded.any()
    assert NUMPY.profile_accumulate(frame, bins, n_bins, 3.0, 0.25, hot).excluded.sum() > 0


@needs_c
@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32, np.float32])
def test_profile_accumulate_parity_per_pixel_dark_and_gain(dtype):
    rng = np.random.default_rng(12)
    n, n_bins = 4_097, 16
    frame, bins = _frame(rng, n, dtype), _bins(rng, n, n_bins, run=9)
    offset = rng.normal(20, 5, n).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    for off, sc in [(offset, 1.0), (2.0, scale), (offset, scale)]:
        ref = NUMPY.profile_accumulate(frame, bins, n_bins, off, sc, 2000.0)
        got = C.profile_accumulate(frame, bins, n_bins, off, sc, 2000.0)
        _assert_profile_equal(got, ref)
        assert ref.excluded.sum() > 0


@needs_c
@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (100.5, 0.1)])
def test_profile_accumulate_uint16_full_range_long_runs(offset, scale):
    """uint16 SIMD path: values >= 2**15 (pixel-by-pixel chunks), runs > 16, frame end."""
    rng = np.random.default_rng(13)
    lengths = rng.integers(1, 41, 400)
    bins = np.repeat(rng.integers(-1, 23, lengths.size), lengths).astype(np.int32)
    bins[-5:] = 4
    n = bins.size
    frame = rng.integers(0, 65536, n).astype(np.uint16)
    frame[: n // 2] = rng.integers(0, 300, n // 2)  # SIMD chunks, some hot
    frame[:50] = 65535
    ws = C.workspace(bins, 23)
    for hot in (np.inf, 0.8 * (65535 - offset) * scale, 150.0):
        ref = NUMPY.profile_accumulate(frame, bins, 23, offset, scale, hot)
        _assert_profile_equal(C.profile_accumulate(frame, bins, 23, offset, scale, hot, ws), ref)


@pytest.mark.parametrize("kern", ["numpy", pytest.param("c", marks=needs_c)])
def test_profile_accumulate_counts_nonfinite_only_in_used_pixels(kern):
    k = K.get_kernels(kern)
    frame = np.arange(12, dtype=np.float64)
    bins = np.array([0, 0, 1, 1, -1, -1, 2, 2, 2, 0, 1, 2], np.int32)
    frame[[0, 6]] = np.nan
    frame[7] = np.inf
    frame[4] = np.nan  # masked: ignored
    frame[11] = 500.0  # hot
    r = k.profile_accumulate(frame, bins, 3, 0.0, 1.0, 100.0)
    assert r.n_nonfinite == 3
    np.testing.assert_array_equal(r.excluded, [1, 0, 3])
    np.testing.assert_array_equal(r.sum, [1 + 9, 2 + 3 + 10, 8])


def test_bin_chunks_cover_the_binned_pixels_in_short_chunks():
    rng = np.random.default_rng(14)
    bins = _bins(rng, 5_000, 300, run=37)
    bins[:40] = 7  # a run longer than two chunks at the start
    start, code = K.bin_chunks(bins)
    length, chunk_bin = (code & 15) + 1, code >> 4
    assert np.all(length <= K.CHUNK) and np.all(np.diff(start) >= length[:-1])
    covered = np.full(bins.size, -1)
    for s, n, b in zip(start, length, chunk_bin):
        covered[s:s + n] = b
    np.testing.assert_array_equal(covered, bins)
    assert start[:3].tolist() == [0, 16, 32] and length[:3].tolist() == [16, 16, 8]


@pytest.fixture
def simd_levels():
    """The SIMD levels this machine runs (0 scalar, 1 SSE2, 2 AVX2); restored afterwards."""
    top = C.simd_level()
    yield list(range(top + 1))
    C.simd_level(top)


@needs_c
@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (2.5, 0.7)])
def test_uint16_paths_agree_at_every_simd_level(simd_levels, offset, scale):
    """Every SIMD level gives the reference's numbers: chunks of small values (vector
    path), chunks with values >= 2**14 or hot pixels (pixel path), the frame's last
    16 pixels; scalar and per-pixel (dark, gain) offset and scale."""
    rng = np.random.default_rng(15)
    lengths = rng.integers(1, 30, 600)
    bins = np.repeat(rng.integers(-1, 50, lengths.size), lengths).astype(np.int32)
    bins[-3:] = 9
    n = bins.size
    frame = rng.poisson(3.0, n).astype(np.uint16)
    big = rng.random(n) < 0.002
    frame[big] = rng.integers(16000, 65536, big.sum())
    frame[-2] = 40
    off_px = (offset + rng.normal(0, 0.3, n)).astype(np.float32)  # a dark frame
    sc_px = (scale * rng.uniform(0.8, 1.2, n)).astype(np.float32)  # a gain map
    sc_px[:7] = 0.0
    for off, sc in [(offset, scale), (off_px, scale), (offset, sc_px), (off_px, sc_px)]:
        for hot, cand in [(np.inf, 5.0), (30.0, 4.0), (np.inf, np.inf), (np.inf, -1.0)]:
            ref = NUMPY.accumulate(frame, bins, 50, off, sc, hot, cand)
            pref = NUMPY.profile_accumulate(frame, bins, 50, off, sc, hot)
            for level in simd_levels:
                assert C.simd_level(level) == level
                got = C.accumulate(frame, bins, 50, off, sc, hot, cand)
                _assert_acc_equal(got, ref, frame, bins, off, sc, hot, cand)
                _assert_profile_equal(C.profile_accumulate(frame, bins, 50, off, sc, hot), pref)


@needs_c
def test_find_peaks_span_bins_optional_and_checked():
    rng = np.random.default_rng(16)
    block_shape = (2, 30, 40)
    frame = _peak_scene(rng, block_shape, np.uint16)
    bins = (np.arange(frame.size) % 5).astype(np.int32)
    ws = C.workspace(bins, 5)
    acc = C.accumulate(frame, bins, 5, 0.0, 1.0, np.inf, 10.0, ws)
    np.testing.assert_array_equal(acc.span_bin, bins[acc.span_start])
    args = (frame, block_shape, bins, 0.0, 1.0, np.inf, np.full(5, 12.0), np.ones(5), None,
            8, 2, 50)
    got = C.find_peaks(*args, acc, ws)
    assert got[0] > 3
    from dataclasses import replace
    assert C.find_peaks(*args, replace(acc, span_bin=None), ws) == got
    assert C.find_peaks(*args, replace(acc, span_bin=acc.span_bin.copy()), ws) == got
    with pytest.raises(ValueError, match="span_bin"):
        C.find_peaks(*args, replace(acc, span_bin=acc.span_bin + 5), ws)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_common_mode_parity(dtype):
    rng = np.random.default_rng(17)
    n, n_panels = 6_001, 8  # panel 7 has no pixel; -1 = not used
    panel = rng.integers(-1, 7, n).astype(np.int32)
    frame = _frame(rng, n, dtype)
    if np.issubdtype(dtype, np.floating):
        frame[rng.integers(0, n, 20)] = np.nan  # ignored
    top = float(np.nanmax(frame))
    offset = rng.normal(5, 2, n).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    scale[:50] = 0.0  # dead pixels: offset unchanged
    # "below" at ~30 % and ~60 % of the range: medians inside the histogram, and under it
    for off, sc, below in [(3.0, 4.0 / top, 1.2), (offset, 1.0, 0.3 * top),
                           (2.0, scale, 0.6 * top), (offset, scale, 0.1 * top),
                           (-4.0, 1.0, 0.2 * top), (3.0, 0.1, 0.2 * top)]:
        for stride in (1, 3):
            ref = NUMPY.common_mode(frame, panel, n_panels, off, sc, below, stride=stride)
            got = C.common_mode(frame, panel, n_panels, off, sc, below, C.workspace(panel, 1),
                                stride=stride)
            # the same bins and counts; the mean of the median bin is summed in another
            # order for integer frames (C: per raw value), so it may differ in the last bit
            np.testing.assert_allclose(got.median, ref.median, rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(got.offset, ref.offset, rtol=1e-6, atol=1e-6)
            assert ref.median[7] == 0 and np.any(ref.median[:7] != 0)


@needs_c
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.float32])
def test_common_mode_split_offsets_parity(dtype):
    """split=True: integer offsets as SplitOffset (int16 deltas) where they are integers,
    the float32 array otherwise; with and without an integral dark (SplitOffset input)."""
    rng = np.random.default_rng(18)
    n, n_panels = 5_003, 5
    panel = np.repeat(rng.integers(-1, n_panels, n // 40 + 1), 40)[:n].astype(np.int32)
    frame = _frame(rng, n, dtype)
    dark = K.split_offset(np.round(rng.normal(20, 5, n)))
    for off, sc, below in [(3.0, 1.0, 0.4 * float(frame.max())), (dark, 1.0, 30.0),
                           (3.0, 0.5, 20.0), (dark, 0.05, 2.0)]:
        ref = NUMPY.common_mode(frame, panel, n_panels, off, sc, below, split=True)
        got = C.common_mode(frame, panel, n_panels, off, sc, below, C.workspace(panel, 1),
                            split=True)
        assert type(got.offset) is type(ref.offset)
        np.testing.assert_allclose(got.median, ref.median, rtol=1e-13, atol=1e-15)
        vals = [K.offset_values(x.offset) for x in (got, ref)]
        np.testing.assert_allclose(vals[0], vals[1], rtol=1e-6)
        plain = NUMPY.common_mode(frame, panel, n_panels, off, sc, below)
        np.testing.assert_array_equal(K.offset_values(ref.offset), plain.offset)
    # medians in the histogram of a frame of whole values are raw values: integer offsets
    one = np.where(panel >= 0, 7 + (np.arange(n) % 2), 50).astype(dtype)  # 7s and 8s
    for k in (NUMPY, C):
        cm = k.common_mode(one, panel, n_panels, 3.0, 1.0, 5.0, C.workspace(panel, 1), split=True)
        assert isinstance(cm.offset, K.SplitOffset)  # whole values, any dtype
        np.testing.assert_array_equal(K.offset_values(cm.offset)[panel >= 0], 7.0)


def test_sampled_common_mode_agrees_with_the_exact_median():
    """Every 4th pixel (the preprocessing's stride) gives each ASIC's median within 0.01
    photon: 185 x 194 ASICs of 0-3 photon Poisson pixels with 0.15 photon Gaussian read
    noise, 30 ADU/photon, offsets of -0.4..0.4 photon per ASIC."""
    rng = np.random.default_rng(19)
    n_asic = 4
    shape = (n_asic, 185, 194)
    shift = rng.uniform(-0.4, 0.4, n_asic)
    photons = rng.poisson(0.3, shape) + rng.normal(0, 0.15, shape) + shift[:, None, None]
    frame = np.round(1000 + 30 * photons).astype(np.uint16).reshape(-1)
    panel = np.repeat(np.arange(n_asic, dtype=np.int32), 185 * 194)
    for k in (NUMPY,) + ((C,) if C is not None else ()):
        exact = k.common_mode(frame, panel, n_asic, 1000.0, 1 / 30, 0.5).median
        sampled = k.common_mode(frame, panel, n_asic, 1000.0, 1 / 30, 0.5, stride=4).median
        np.testing.assert_allclose(sampled, exact, atol=0.01)
        np.testing.assert_allclose(exact, shift, atol=0.05)  # it is the common mode
        assert np.any(sampled != exact) or k is C  # sampling changes something (numpy)


@needs_c
def test_split_offset_accumulate_parity_at_every_simd_level(simd_levels):
    """An integral dark as SplitOffset (int16 deltas): the same sums, maxima, spans and
    peaks as the float32 dark, at every SIMD level, values over 32767 and under the
    dark included."""
    rng = np.random.default_rng(20)
    lengths = rng.integers(1, 30, 600)
    bins = np.repeat(rng.integers(-1, 50, lengths.size), lengths).astype(np.int32)
    n = bins.size
    dark = np.round(rng.normal(1500, 40, n)).astype(np.float32)
    frame = (dark + rng.poisson(3.0, n) - rng.integers(0, 3, n)).astype(np.uint16)
    big = rng.random(n) < 0.003
    frame[big] = rng.integers(16000, 65536, big.sum())
    frame[rng.random(n) < 0.002] = 0  # far under the dark
    split = K.split_offset(dark)
    assert split is not None and split.delta.dtype == np.int16
    np.testing.assert_array_equal(split.values(), dark)
    for sc in (1.0, 0.25):
        for hot, cand in [(np.inf, 5.0), (30.0, 4.0), (np.inf, -1.0), (np.inf, np.inf)]:
            ref = NUMPY.accumulate(frame, bins, 50, dark, sc, hot, cand)
            pref = NUMPY.profile_accumulate(frame, bins, 50, dark, sc, hot)
            assert _acc_same(NUMPY.accumulate(frame, bins, 50, split, sc, hot, cand), ref)
            for level in simd_levels:
                assert C.simd_level(level) == level
                got = C.accumulate(frame, bins, 50, split, sc, hot, cand)
                _assert_acc_equal(got, ref, frame, bins, dark, sc, hot, cand)
                _assert_profile_equal(C.profile_accumulate(frame, bins, 50, split, sc, hot), pref)
    # peaks: the same components with either offset
    block = (1, 40, n // 40)
    m = block[0] * block[1] * block[2]
    f2, b2, d2 = frame[:m], (np.arange(m) % 7).astype(np.int32), dark[:m]
    s2 = K.split_offset(d2)
    acc = C.accumulate(f2, b2, 7, s2, 1.0, np.inf, 5.0)
    thr, bg = np.full(7, 6.0), np.zeros(7)
    want = NUMPY.find_peaks(f2, block, b2, d2, 1.0, np.inf, thr, bg, None, 8, 1, 100, acc)
    assert C.find_peaks(f2, block, b2, s2, 1.0, np.inf, thr, bg, None, 8, 1, 100, acc) == want
    assert want[0] > 0


def _acc_same(a, b):
    return (np.allclose(a.sum, b.sum, rtol=1e-12) and np.array_equal(a.binmax, b.binmax)
            and np.array_equal(a.span_start, b.span_start) and a.n_lit == b.n_lit)


def test_common_mode_median_is_the_lower_median_below_the_limit():
    frame = np.array([10, 12, 11, 13, 90, 50, 50, 52, 51, 2, 3, 4, 7], np.uint16)
    panel = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, -1], np.int32)
    for k in (NUMPY,) + ((C,) if C is not None else ()):
        # 0.5 photon/ADU, below 8 photons: the histogram covers [4, 8) photons
        cm = k.common_mode(frame, panel, 3, 0.0, 0.5, 8.0)
        # panel 0: 5, 5.5, 6, 6.5 (45 is above the limit) -> lower median 5.5;
        # panel 1: nothing below the limit -> 0; panel 2: all under the histogram -> their mean
        np.testing.assert_array_equal(cm.median, [5.5, 0.0, 1.5])
        np.testing.assert_array_equal(cm.offset, [11] * 5 + [0] * 4 + [3] * 3 + [0])


@needs_c
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int16])
def test_panel_offset_parity_at_every_simd_level(simd_levels, dtype):
    """Per-panel integer offsets (PanelOffset, one table look-up per chunk): the same sums,
    maxima, spans, profile and peaks as the per-pixel SplitOffset, at every SIMD level;
    chunks of a workspace built with panel ids never straddle a panel."""
    rng = np.random.default_rng(22)
    lengths = rng.integers(1, 40, 500)
    bins = np.repeat(rng.integers(-1, 30, lengths.size), lengths).astype(np.int32)
    n = bins.size
    plen = rng.integers(5, 70, n // 5)  # panel runs that cut bin runs
    panel = np.repeat(rng.integers(-1, 6, plen.size), plen)[:n].astype(np.int32)
    table = np.array([0, -40, 3, 700, -32768, 32767, 12], np.int16)
    po = K.PanelOffset(1024.0, table, panel)
    split = po.split()
    np.testing.assert_array_equal(po.values(), split.values())
    lo_, hi_ = np.iinfo(dtype).min, np.iinfo(dtype).max
    if dtype == np.uint16:
        frame = np.clip(po.values() + rng.poisson(3.0, n) - 2, lo_, hi_).astype(dtype)
        frame[rng.random(n) < 0.003] = rng.integers(16000, 65536, 1)[0]
    else:
        frame = rng.integers(lo_, hi_ + 1, n).astype(dtype)
    ws = C.workspace(bins, 30, panel=panel)
    s, ln = ws.chunk_start, (ws.chunk_code & 15) + 1
    assert ws.chunk_start.size > C.workspace(bins, 30).chunk_start.size  # split at panels
    assert np.array_equal(panel[s], panel[s + ln - 1])  # runs: one panel per chunk
    run = np.cumsum(np.concatenate(([0], panel[1:] != panel[:-1])))
    assert np.array_equal(run[s], run[s + ln - 1])
    for sc in (1.0, 0.25):
        for hot, cand in [(np.inf, 5.0), (30.0, 4.0), (np.inf, -1.0)]:
            ref = NUMPY.accumulate(frame, bins, 30, split, sc, hot, cand)
            pref = NUMPY.profile_accumulate(frame, bins, 30, split, sc, hot)
            assert _acc_same(NUMPY.accumulate(frame, bins, 30, po, sc, hot, cand), ref)
            for level in simd_levels:
                assert C.simd_level(level) == level
                for w in (ws, None):  # None: no chunk table, the SplitOffset is used
                    got = C.accumulate(frame, bins, 30, po, sc, hot, cand, w)
                    _assert_acc_equal(got, ref, frame, bins, split, sc, hot, cand)
                    _assert_profile_equal(C.profile_accumulate(frame, bins, 30, po, sc, hot, w),
                                          pref)
    block = (1, 50, n // 50)
    m = block[1] * block[2]
    f2, b2, p2 = frame[:m], (np.arange(m) % 7).astype(np.int32), panel[:m]
    po2 = K.PanelOffset(1024.0, table, p2)
    ws2 = C.workspace(b2, 7, panel=p2)
    acc = C.accumulate(f2, b2, 7, po2, 1.0, np.inf, 5.0, ws2)
    thr, bg = np.full(7, 6.0), np.zeros(7)
    want = NUMPY.find_peaks(f2, block, b2, po2.split(), 1.0, np.inf, thr, bg, p2, 8, 1, 100, acc)
    assert C.find_peaks(f2, block, b2, po2, 1.0, np.inf, thr, bg, p2, 8, 1, 100, acc, ws2) == want
    assert want[0] > 0


@needs_c
def test_common_mode_panel_table_parity():
    """panel_table=True: one int16 delta per panel (entry 0: no panel), the same offsets as
    the split per-pixel ones; a per-pixel dark or a fractional median keeps those."""
    rng = np.random.default_rng(23)
    n, n_panels = 6_001, 5
    panel = np.repeat(rng.integers(-1, n_panels, n // 30 + 1), 30)[:n].astype(np.int32)
    frame = (100 + rng.poisson(0.3, n) * 20 + rng.integers(-6, 7, n_panels + 1)[panel + 1]
             ).astype(np.uint16)
    for k in (NUMPY, C):
        cm = k.common_mode(frame, panel, n_panels, 100.0, 1 / 20, 0.5, C.workspace(panel, 1),
                           stride=4, split=True, panel_table=True)
        flat = k.common_mode(frame, panel, n_panels, 100.0, 1 / 20, 0.5, C.workspace(panel, 1),
                             stride=4, split=True)
        assert isinstance(cm.offset, K.PanelOffset) and cm.offset.panel is panel
        assert cm.offset.table.dtype == np.int16 and cm.offset.table.size == n_panels + 1
        np.testing.assert_array_equal(cm.offset.values(), K.offset_values(flat.offset))
        np.testing.assert_array_equal(cm.median, flat.median)
        dark = K.split_offset(np.full(n, 100.0))
        assert isinstance(k.common_mode(frame, panel, n_panels, dark, 1 / 20, 0.5,
                                        C.workspace(panel, 1), split=True,
                                        panel_table=True).offset, K.SplitOffset)
        frac = k.common_mode(frame.astype(np.float32) + 0.5, panel, n_panels, 100.0, 1 / 20,
                             0.5, C.workspace(panel, 1), split=True, panel_table=True)
        assert not isinstance(frac.offset, K.PanelOffset)
