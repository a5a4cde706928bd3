"""Keras CNN+DNN models for detector frames: builders, blueprints, training loop."""
