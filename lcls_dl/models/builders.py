"""Keras 3 functional builders for the water/ice classifier.

The default model has two branches joined into one head::

    image (H, W, C) --> normalize --> MaxPool --> [Conv2D 3x3 + ReLU + MaxPool] x k --> global max+avg --+
                                                                                              +--> concat
    profile (Q,) + scalars (S,) --> normalize --> [Dense + ReLU] x m ---------------------------+
        --> Dense "embedding" --> Dropout "mc_dropout" --> Dense "logits" --> Softmax "probs"

``kind="cnn"`` keeps only the image branch, ``kind="dnn"`` only the profile+scalar branch.
Layer widths come from a blueprint (:mod:`lcls_dl.models.blueprint`).

The model has no batch normalization, so ``model(x, training=True)`` changes only the
dropout: that is Monte-Carlo dropout at inference (see
:func:`lcls_dl.models.model_dir.predict_proba`). Inputs are a dict keyed ``"image"``,
``"profile"``, ``"scalars"`` (only the keys the model uses: :func:`select_inputs`). Input
normalization (mean/std measured on training frames) is part of the model, so a saved
model takes the dataset's arrays as they are.

Examples
--------
>>> model = build_model("cnn+dnn", (32, 64), 64, 4, 2, seed=1)      # doctest: +SKIP
>>> model.output_names, model.get_layer("embedding").units          # doctest: +SKIP
(['probs'], 32)
"""
import numpy as np

from .blueprint import validate_blueprint

KINDS = ("cnn+dnn", "cnn", "dnn")


def input_names(kind, n_scalars=1):
    """Input arrays a model of ``kind`` reads, e.g. ``['image']`` for ``"cnn"``."""
    names = []
    if kind in ("cnn+dnn", "cnn"):
        names.append("image")
    if kind in ("cnn+dnn", "dnn"):
        names.append("profile")
        if n_scalars:
            names.append("scalars")
    return names


def select_inputs(model, arrays):
    """The subset of ``arrays`` (dict) that ``model`` takes, as float32, keyed by input name."""
    return {t.name.split(":")[0]: np.asarray(arrays[t.name.split(":")[0]], np.float32)
            for t in model.inputs}


def _norm(keras, name, stats, axis):
    if stats is None:
        return None
    mean, std = (np.asarray(s, np.float32) for s in stats)
    if axis is not None and mean.ndim == 0:  # one (mean, std) for every channel
        axis = None
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    return keras.layers.Normalization(axis=axis, mean=mean, variance=std ** 2, name=name)


def image_input_shape(image_shape):
    """``(H, W, C)`` of the CNN input from a dataset's per-frame image shape.

    ``(H, W)`` (1-channel datasets) gives ``(H, W, 1)``; ``(H, W, C)`` is kept.

    Examples
    --------
    >>> image_input_shape((16, 32)), image_input_shape((16, 32, 2))
    ((16, 32, 1), (16, 32, 2))
    """
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        return shape + (1,)
    if len(shape) != 3 or min(shape) < 1:
        from ..errors import ConfigError

        raise ConfigError(f"image shape must be (H, W) or (H, W, C), got {shape}")
    return shape


def build_model(kind="cnn+dnn", image_shape=None, profile_len=None, n_scalars=0, n_classes=2,
                blueprint=None, seed=0, norm=None):
    """Build an uncompiled Keras model.

    Parameters
    ----------
    kind : {"cnn+dnn", "cnn", "dnn"}
    image_shape : tuple (H, W, C) or (H, W)
        Per-frame polar image shape as stored in the dataset (needed for kinds with a CNN
        branch); ``(H, W)`` is one channel.
    profile_len, n_scalars : int
        Radial profile length and scalar count (needed for kinds with a DNN branch).
    n_classes : int
        Number of classes (>= 2).
    blueprint : dict, optional
        Topology (validated by :func:`lcls_dl.models.blueprint.validate_blueprint`).
    seed : int
        Seeds every initializer and the dropout layer, so a fixed seed gives the same model.
    norm : dict, optional
        ``{"image": (mean[C], std[C]) or scalars, "profile": (mean[Q], std[Q]),
        "scalars": (mean[S], std[S])}``
        measured on training frames (:func:`lcls_dl.models.data.normalization_stats`);
        missing entries mean no normalization of that input.

    Returns
    -------
    keras.Model
        Inputs named ``image``/``profile``/``scalars``, output ``probs`` (softmax); layers
        ``embedding`` and ``logits`` readable through :func:`sub_model`.
    """
    import keras

    if kind not in KINDS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown model kind {kind!r} (choose {', '.join(KINDS)})")
    if n_classes < 2:
        from ..errors import ConfigError

        raise ConfigError(f"a classifier needs at least 2 classes, got {n_classes}")
    bp = validate_blueprint(blueprint)
    act = bp["activation"]
    norm = norm or {}
    counter = iter(range(1000))

    def init():
        return keras.initializers.GlorotUniform(seed=seed * 1000 + next(counter))

    inputs, branches = [], []
    if kind in ("cnn+dnn", "cnn"):
        h, w, c = image_input_shape(image_shape)
        if len(tuple(image_shape)) == 2:
            image = keras.Input((h, w), name="image")
            x = keras.layers.Reshape((h, w, 1), name="image_channel")(image)
        else:
            image = keras.Input((h, w, c), name="image")
            x = image
        inputs.append(image)
        layer = _norm(keras, "image_norm", norm.get("image"), -1)
        if layer is not None:
            x = layer(x)
        cnn = bp["cnn"]
        k_in = cnn["input_pool"]
        if k_in > 1 and min(h, w) >= 2 * k_in:
            x = keras.layers.MaxPooling2D(k_in, name="input_pool")(x)
        for i, filters in enumerate(cnn["filters"]):
            x = keras.layers.Conv2D(filters, cnn["kernel"], padding="same", activation=act,
                                    kernel_initializer=init(), name=f"conv{i}")(x)
            if cnn["pool"] > 1 and min(x.shape[1], x.shape[2]) >= 2 * cnn["pool"]:
                x = keras.layers.MaxPooling2D(cnn["pool"], name=f"pool{i}")(x)
        pooled = []
        if "max" in cnn["global_pool"]:
            pooled.append(keras.layers.GlobalMaxPooling2D(name="cnn_max")(x))
        if "avg" in cnn["global_pool"]:
            pooled.append(keras.layers.GlobalAveragePooling2D(name="cnn_avg")(x))
        branches.append(pooled[0] if len(pooled) == 1
                        else keras.layers.Concatenate(name="cnn_features")(pooled))
    if kind in ("cnn+dnn", "dnn"):
        profile = keras.Input((int(profile_len),), name="profile")
        inputs.append(profile)
        p = _norm(keras, "profile_norm", norm.get("profile"), -1)
        parts = [p(profile) if p is not None else profile]
        if n_scalars:
            scalars = keras.Input((int(n_scalars),), name="scalars")
            inputs.append(scalars)
            s = _norm(keras, "scalars_norm", norm.get("scalars"), -1)
            parts.append(s(scalars) if s is not None else scalars)
        y = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="dnn_input")(parts)
        for i, units in enumerate(bp["dnn"]["units"]):
            y = keras.layers.Dense(units, activation=act, kernel_initializer=init(),
                                   name=f"dense{i}")(y)
        branches.append(y)
    z = branches[0] if len(branches) == 1 else keras.layers.Concatenate(name="joined")(branches)
    z = keras.layers.Dense(bp["head"]["embedding"], activation=act, kernel_initializer=init(),
                           name="embedding")(z)
    z = keras.layers.Dropout(bp["head"]["dropout"], seed=seed, name="mc_dropout")(z)
    logits = keras.layers.Dense(n_classes, kernel_initializer=init(), name="logits")(z)
    probs = keras.layers.Softmax(name="probs")(logits)
    return keras.Model(inputs=inputs, outputs=probs, name=f"lcls_dl_{kind.replace('+', '_')}")


def sub_model(model, layer="embedding"):
    """A model sharing ``model``'s weights whose output is layer ``layer`` (e.g. ``"logits"``)."""
    import keras

    return keras.Model(model.inputs, model.get_layer(layer).output,
                       name=f"{model.name}_{layer}")
