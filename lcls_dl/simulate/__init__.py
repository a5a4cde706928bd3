"""Physically realistic simulated LCLS water/ice diffraction runs.

``simulate_run(out_dir, n_frames, seed=...)`` writes CXI files + truth.csv + run.json;
``render_frame(geometry, params, rng)`` draws one frame (see :mod:`lcls_dl.simulate.run`).
Physics in :mod:`~lcls_dl.simulate.physics`, detector effects in
:mod:`~lcls_dl.simulate.detector_response`.
"""
from .detector_response import DetectorResponse, sample_photons
from .run import CLASSES, TRUTH_COLUMNS, SimParams, Simulator, draw_shot, render_frame, simulate_run

__all__ = ["CLASSES", "TRUTH_COLUMNS", "DetectorResponse", "SimParams", "Simulator", "draw_shot",
           "render_frame", "sample_photons", "simulate_run"]
