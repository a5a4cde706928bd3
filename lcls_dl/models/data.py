"""Training data from an ingested dataset: splits, streaming batches, physics-aware augmentation.

Splits
------
:func:`split_rows` assigns every *labeled* frame to train / val / test by hashing
``"<seed>:<sample id>"`` (SHA-256 -> uniform number in [0, 1)), so the split of a frame
never depends on the order of frames, on shards, on other frames, or on the number of MPI
ranks, and a frame keeps its split when new labels arrive.

Streaming
---------
:func:`iter_batches` never loads the dataset: each epoch it draws a permutation of the
partition's rows from ``(seed, epoch)``, reads them block by block (``block`` frames, the
shuffle buffer) through :meth:`lcls_dl.dataset.Dataset.read`, augments and yields batches.
:func:`make_tf_dataset` wraps it in ``tf.data`` with prefetch so reading the next block
overlaps the training step. Batch order and augmentation are pure functions of
``(seed, epoch, rank)``, so a resumed run sees exactly the batches an uninterrupted one sees.

Augmentation (on by default; :class:`Augmenter`)
-----------------------------------------------
The CNN image is the polar (q, phi) unwrap of :mod:`lcls_dl.ingest.preprocess`: rows are q,
columns azimuth phi. Ingest divides image and profile by ``norm = max(frame mean photons,
norm_floor) * transform_scale`` and then applies ``transform`` (``asinh``, ``log1p``,
``linear`` or ``none`` = raw photons), keeping the absolute scale in the scalars. The
augmentations act on what the detector would have seen and are carried through that chain:

- rotation about the beam centre = a circular roll along phi (any shift);
- mirror about a line through the beam centre = a flip along phi (p = 0.5);
- intensity scaling (shot-to-shot pulse energy and droplet size): photons times
  ``a = exp(N(0, 0.2))``. The image and profile are inverted to photons (``transform``
  inverse times ``norm``, the frame mean taken from the ``log10_mean_photons`` scalar),
  scaled, and re-normalized exactly as ingest does -- so above the ``norm_floor`` they do not
  change, as in real data -- and the absolute-scale scalars (``log10_total_photons``,
  ``log10_mean_photons``, ``log10_ring_mean``, ``log10_peak_photons``, ``log10_max_pixel``)
  move by the same factor. Counts, ratios and positions (``n_peaks``, ``ring_ratio``,
  ``s1_peak_q``, ``lit_fraction``) are left as they are;
- photon-noise-like jitter on the image: Gaussian noise of standard deviation
  ``0.5 * sqrt(photons / pixels per bin)`` (half the Poisson noise of a polar bin; pixels per
  bin = (total photons / mean photons) / (H * W)), clipped at zero photons.

Two-channel images ``(N, H, W, 2)`` (channel 0 mean photons, channel 1 max local SNR, see
:mod:`lcls_dl.ingest.preprocess`): roll and flip move both channels together; intensity
scaling treats channel 0 as above and multiplies the SNR channel by ``sqrt(a)`` (after
undoing its ``transform``; no frame normalization there): when photons scale by ``a``, a
spot's excess over the ring scales by ``a`` and the Poisson sigma of the ring by
``sqrt(a)``. (Where sigma is dominated by real structure -- polarization -- the SNR would
not change; sqrt is the photon-limited case that matters for weak spots.) The jitter is
added to channel 0 only. A 2-D image ``(N, H, W)`` is one mean channel.

Without the photon scalars (e.g. a dataset ingested with other scalar features) intensity
scaling and noise are skipped and only roll/flip apply; this is logged once.
"""
import logging
import math

import numpy as np

from ..dataset import split_fraction, split_rows  # noqa: F401 (their home before)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def normalization_stats(dataset, rows, max_frames=512, seed=0, arrays=("image", "profile",
                                                                       "scalars")):
    """Mean/std of the model inputs on up to ``max_frames`` training frames.

    The image gets one (mean, std) per channel over all pixels (a per-pixel one would
    break the phi symmetry; a 2-D 1-channel image gets scalars); profile and scalars get
    one per bin / feature.
    """
    rows = np.asarray(rows)
    if len(rows) > max_frames:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_frames, replace=False))
    batch = dataset.read(rows, arrays)
    out = {}
    for name in arrays:
        x = batch[name].astype(np.float64)
        if x.size == 0 or (x.ndim == 2 and x.shape[1] == 0):
            continue
        if name == "image" and x.ndim == 4:
            axes = (0, 1, 2)
            out[name] = (x.mean(axis=axes).astype(np.float32), x.std(axis=axes).astype(np.float32))
        elif name == "image":
            out[name] = (np.float32(x.mean()), np.float32(x.std()))
        else:
            out[name] = (x.mean(axis=0).astype(np.float32), x.std(axis=0).astype(np.float32))
    return out


def class_weights(labels, n_classes):
    """Balanced class weights ``n / (k * count_c)`` (0 for an absent class)."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)


_INVERSE = {"asinh": np.sinh, "log1p": np.expm1, "linear": lambda y: y, "none": lambda y: y}
_FORWARD = {"asinh": np.arcsinh, "log1p": lambda x: np.log1p(np.maximum(x, 0.0)),
            "linear": lambda x: x, "none": lambda x: x}
# scalar name -> offset c in  s = log10(c + v)  (v scales with the photon count)
_LOG_SCALARS = {"log10_total_photons": 1.0, "log10_peak_photons": 1.0, "log10_max_pixel": 1.0,
                "log10_mean_photons": 1e-4, "log10_ring_mean": 1e-4}


class Augmenter:
    """Physics-respecting augmentation of a batch dict (see module docstring).

    Parameters
    ----------
    preprocessing : dict
        The manifest's ``preprocessing`` block (``transform``, ``transform_scale``,
        ``norm_floor``, ``scalar_names``).
    scale_sigma : float
        Log-normal sigma of the photon-count factor.
    noise : float
        Jitter in units of the Poisson noise of a polar bin.
    roll, flip : bool
        Rotation / mirror along phi.
    """

    def __init__(self, preprocessing=None, scale_sigma=0.2, noise=0.5, roll=True, flip=True):
        pre = preprocessing or {}
        self.transform = str(pre.get("transform", "asinh"))
        self.tscale = float(pre.get("transform_scale", 1.0) or 1.0)
        self.floor = float(pre.get("norm_floor", 0.0) or 0.0)
        names = list(pre.get("scalar_names", []))
        self.scalar_index = {n: i for i, n in enumerate(names)}
        self.scale_sigma, self.noise, self.roll, self.flip = scale_sigma, noise, roll, flip
        self.intensity = (self.transform in _INVERSE and "log10_mean_photons" in self.scalar_index
                          and "log10_total_photons" in self.scalar_index)
        if not self.intensity and (scale_sigma > 0 or noise > 0):
            log.info("augmentation: no photon scalars or unknown transform %r; intensity "
                     "scaling and photon noise off (roll/flip only)", self.transform)

    def _norm(self, mean):
        if self.transform == "none":
            return np.ones_like(mean)
        return np.maximum(mean, self.floor) * self.tscale

    def __call__(self, batch, rng):
        """Return an augmented copy of ``batch`` (dict of arrays, leading axis frames)."""
        out = dict(batch)
        n = len(next(iter(batch.values())))
        if "image" in batch:
            img = np.array(batch["image"], np.float32, copy=True)
            n_phi = img.shape[2] if img.ndim >= 3 else 0
            if self.roll and n_phi > 1:
                shifts = rng.integers(0, n_phi, n)
                cols = (np.arange(n_phi)[None, :] - shifts[:, None]) % n_phi
                idx = cols.reshape((n, 1, n_phi) + (1,) * (img.ndim - 3))
                img = np.take_along_axis(img, np.broadcast_to(idx, img.shape), axis=2)
            if self.flip:
                flip = rng.random(n) < 0.5
                img[flip] = img[flip][:, :, ::-1]
            out["image"] = img
        if not self.intensity or "scalars" not in batch:
            return out
        sc = np.array(batch["scalars"], np.float64, copy=True)
        mean = np.maximum(10.0 ** sc[:, self.scalar_index["log10_mean_photons"]] - 1e-4, 0.0)
        total = np.maximum(10.0 ** sc[:, self.scalar_index["log10_total_photons"]] - 1.0, 0.0)
        factor = np.exp(rng.normal(0.0, self.scale_sigma, n)) if self.scale_sigma > 0 \
            else np.ones(n)
        norm_old, norm_new = self._norm(mean), self._norm(mean * factor)
        inv, fwd = _INVERSE[self.transform], _FORWARD[self.transform]
        for name in ("image", "profile"):
            if name not in out:
                continue
            y = np.asarray(out[name], np.float64)
            snr = None
            if name == "image" and y.ndim == 4:  # (N, H, W, C): channel 1 is max SNR
                snr = y[..., 1:]
                y = y[..., 0]
            shape = (n,) + (1,) * (y.ndim - 1)
            photons = inv(y) * norm_old.reshape(shape) * factor.reshape(shape)
            if name == "image" and self.noise > 0:
                pix = np.where(mean > 0, total / np.maximum(mean, 1e-12), 0.0)
                per_bin = np.maximum(pix / (y.shape[1] * y.shape[2]), 1.0).reshape(shape)
                jitter = rng.standard_normal(y.shape)
                photons = np.maximum(photons + self.noise * np.sqrt(
                    np.maximum(photons, 0.0) / per_bin) * jitter, 0.0)
            y_new = fwd(photons / norm_new.reshape(shape))
            if snr is not None:
                f4 = np.sqrt(factor).reshape((n, 1, 1, 1))
                y_new = np.concatenate([y_new[..., None], fwd(inv(snr) * f4)], axis=-1)
            out[name] = y_new.astype(np.float32)
        for key, offset in _LOG_SCALARS.items():
            j = self.scalar_index.get(key)
            if j is not None:
                v = np.maximum(10.0 ** sc[:, j] - offset, 0.0)
                sc[:, j] = np.log10(offset + v * factor)
        out["scalars"] = sc.astype(np.float32)
        return out


def default_partition(rows, labels, epoch, seed, rank, size):
    """Rows this rank trains on in ``epoch``: everything to rank 0 (single process).

    This is the signature a data-parallel partition must have (see
    :mod:`lcls_dl.distributed.partition`): it gets the training ``rows`` and their
    ``labels`` (same order), and returns the rows of ``rank`` out of ``size``. Every rank must
    compute it identically (pure function of its arguments). The training loop pads short
    partitions so every rank runs the same number of steps.
    """
    if size == 1:
        return np.asarray(rows)
    return np.asarray(rows)[rank::size]


def epoch_rng(seed, epoch, rank, stream=0):
    """Numpy generator for one (seed, epoch, rank, stream): order and augmentation."""
    return np.random.default_rng([int(seed), int(epoch), int(rank), int(stream), 0x1C15])


def epoch_order(part_rows, length, seed, epoch, rank, shuffle=True):
    """This rank's rows for one epoch: shuffled from ``(seed, epoch, rank)``, then wrapped
    around to ``length`` rows when the partition is shorter (so every rank runs the same
    number of steps with the same batch sizes)."""
    rows = np.asarray(part_rows, np.int64)
    if shuffle:
        rows = epoch_rng(seed, epoch, rank, 1).permutation(rows)
    if length is not None and len(rows) and len(rows) < length:
        rows = np.tile(rows, math.ceil(length / len(rows)))[:length]
    return rows


def iter_batches(dataset, rows, labels, batch_size, seed=0, epoch=0, rank=0, shuffle=True,
                 augment=None, block=1024, length=None, arrays=("image", "profile", "scalars")):
    """Yield ``(inputs dict, labels)`` batches, streaming ``block`` frames at a time.

    Parameters
    ----------
    dataset : lcls_dl.dataset.Dataset
    rows : array of int
        Dataset rows (already this rank's partition).
    labels : array of int
        Class index for each of ``rows`` (same order).
    length : int, optional
        Rows per epoch on every rank (the longest partition); a shorter partition wraps.
    augment : Augmenter, optional
    """
    rows = np.asarray(rows, np.int64)
    lab = dict(zip(rows.tolist(), np.asarray(labels).tolist()))
    order = epoch_order(rows, length, seed, epoch, rank, shuffle)
    rng = epoch_rng(seed, epoch, rank, 2)
    block = max(batch_size, (block // batch_size) * batch_size)
    for start in range(0, len(order), block):
        chunk = order[start:start + block]
        data = dataset.read(chunk, arrays)
        y = np.array([lab[r] for r in chunk.tolist()], np.int32)
        for b in range(0, len(chunk), batch_size):
            batch = {k: v[b:b + batch_size] for k, v in data.items()}
            if augment is not None:
                batch = augment(batch, rng)
            yield batch, y[b:b + batch_size]


def make_tf_dataset(dataset, rows, labels, batch_size, shapes, prefetch=2, **kwargs):
    """``tf.data.Dataset`` over :func:`iter_batches` with prefetch (same arguments).

    ``shapes`` is ``{name: per-frame shape}`` of the arrays to read (from
    :meth:`lcls_dl.dataset.Dataset.shapes`, restricted to the model's inputs).
    """
    import tensorflow as tf

    names = tuple(shapes)
    signature = ({n: tf.TensorSpec((None,) + tuple(shapes[n]), tf.float32) for n in names},
                 tf.TensorSpec((None,), tf.int32))
    gen = (lambda: iter_batches(dataset, rows, labels, batch_size, arrays=names, **kwargs))
    return tf.data.Dataset.from_generator(gen, output_signature=signature).prefetch(prefetch)
