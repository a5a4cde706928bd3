"""Model blueprints: describe a CNN+DNN topology in JSON or YAML, without writing Python.

A blueprint is a small mapping; every key is optional and defaults to :data:`DEFAULT`::

    cnn:                      # branch on the polar (q, phi) image, shape (H, W, C)
      input_pool: 2           # max-pool the image by this factor first (1 = off): 4x
                              # cheaper convolutions; max keeps a spot's max-SNR pixel
      filters: [8, 16, 32]    # one Conv2D (3x3, ReLU) + 2x2 max-pool per entry
      kernel: 3
      pool: 2
      global_pool: max+avg    # max | avg | max+avg   (max keeps isolated Bragg spots)
    dnn:                      # branch on the radial profile + scalar features
      units: [64, 32]
    head:
      embedding: 32           # width of the "embedding" layer read by suggest-labels
      dropout: 0.3            # kept usable at inference (Monte-Carlo dropout)
    activation: relu          # relu | elu | gelu | tanh | swish

Unknown keys, wrong types and out-of-range values raise :class:`lcls_dl.errors.ConfigError`
naming the key, so a typo never silently falls back to a default.

Examples
--------
>>> bp = validate_blueprint({"cnn": {"filters": [8, 16]}, "head": {"dropout": 0.1}})
>>> bp["cnn"]["filters"], bp["dnn"]["units"], bp["head"]["dropout"]
([8, 16], [64, 32], 0.1)
"""
import copy
import json
import os

from ..errors import ConfigError

DEFAULT = {
    "cnn": {"input_pool": 2, "filters": [8, 16, 32], "kernel": 3, "pool": 2,
            "global_pool": "max+avg"},
    "dnn": {"units": [64, 32]},
    "head": {"embedding": 32, "dropout": 0.3},
    "activation": "relu",
}
ACTIVATIONS = ("relu", "elu", "gelu", "tanh", "swish")
GLOBAL_POOLS = ("max", "avg", "max+avg")


def _int_list(value, key, where, allow_empty=False):
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise ConfigError(f"blueprint key {key} must be a non-empty list of positive integers, "
                          f"got {value!r}", where)
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v > 4096:
            raise ConfigError(f"blueprint key {key} must hold integers in 1..4096, got {v!r}",
                              where)
        out.append(int(v))
    return out


def _int(value, key, where, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"blueprint key {key} must be an integer in {lo}..{hi}, got {value!r}",
                          where)
    return int(value)


def validate_blueprint(blueprint, where="blueprint"):
    """Check a blueprint mapping and return it merged over :data:`DEFAULT`.

    Parameters
    ----------
    blueprint : dict or None
        Partial or full blueprint; ``None`` gives the default.
    where : str
        Named in error messages (usually the blueprint file).

    Returns
    -------
    dict
        A complete, validated blueprint (a new object).

    Raises
    ------
    ConfigError
        Unknown key, wrong type or value out of range; the message names the key.
    """
    out = copy.deepcopy(DEFAULT)
    if blueprint is None:
        return out
    if not isinstance(blueprint, dict):
        raise ConfigError(f"a blueprint must be a mapping, got {type(blueprint).__name__}", where)
    for section, value in blueprint.items():
        if section not in DEFAULT:
            raise ConfigError(f"unknown blueprint key {section!r} (known: "
                              f"{', '.join(DEFAULT)})", where)
        if section == "activation":
            if value not in ACTIVATIONS:
                raise ConfigError(f"blueprint key activation must be one of "
                                  f"{', '.join(ACTIVATIONS)}, got {value!r}", where)
            out["activation"] = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"blueprint key {section} must be a mapping", where)
        for key, v in value.items():
            if key not in DEFAULT[section]:
                raise ConfigError(f"unknown blueprint key {section}.{key} (known: "
                                  f"{', '.join(DEFAULT[section])})", where)
            name = f"{section}.{key}"
            if key == "filters":
                v = _int_list(v, name, where)
            elif key == "units":
                v = _int_list(v, name, where, allow_empty=True)
            elif key == "kernel":
                v = _int(v, name, where, 1, 15)
            elif key in ("pool", "input_pool"):
                v = _int(v, name, where, 1, 8)
            elif key == "embedding":
                v = _int(v, name, where, 1, 4096)
            elif key == "global_pool":
                if v not in GLOBAL_POOLS:
                    raise ConfigError(f"blueprint key {name} must be one of "
                                      f"{', '.join(GLOBAL_POOLS)}, got {v!r}", where)
            elif key == "dropout":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                    raise ConfigError(f"blueprint key {name} must be a number in [0, 1), "
                                      f"got {v!r}", where)
                v = float(v)
            out[section][key] = v
    return out


def load_blueprint(path):
    """Read a blueprint file (``.json``, ``.yaml`` or ``.yml``) and validate it.

    Raises
    ------
    ConfigError
        Missing or unparsable file, or an invalid blueprint (the message names the key).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError("blueprint file not found", path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # parse errors of either format
        msg = " ".join(str(exc).split())
        raise ConfigError(f"unparsable blueprint: {msg}", path) from None
    return validate_blueprint(data, where=path)
