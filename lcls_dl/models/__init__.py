"""Keras CNN+DNN models for detector frames: builders, blueprints, training loop."""
import os
import sys
import tempfile


def _import_tensorflow_quietly():
    """Import TensorFlow with its start-up chatter silenced.

    TensorFlow 2.21 writes oneDNN/CUDA notices straight to file descriptor 2 before its
    logging is configured, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them. Listing devices
    here triggers the CUDA probe too (its "failed call to cuInit" line on CPU machines)
    without creating the runtime context, so thread settings can still be changed later.
    ``TF_CPP_MIN_LOG_LEVEL=0`` (``lcls-dl -vv``) shows everything; an import failure replays
    what was captured.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_import_tensorflow_quietly()
