"""Scattering physics of supercooled water droplets and ice Ih / stacking-disordered ice.

All intensities here are *expected photons per pixel* before polarization and solid-angle
factors (the caller multiplies by ``geometry.polarization() * geometry.solid_angle()``).

Water: ``I(q) = f_O(q)^2 * S(q)`` with the oxygen Cromer-Mann form factor and a structure
factor of two Gaussian peaks on a smooth baseline (low at q -> 0, 1 at high q). The S1 peak
position is placed so that the *observed* profile ``f_O^2 S`` peaks at the temperature's
fitted S1 position (cxi25410 two-Gaussian fits are of the measured intensity).

Ice: single shots show discrete Bragg spots from a few crystallites, not powder rings.
"""
import numpy as np

# Oxygen Cromer-Mann coefficients, s = q / (4 pi)
O_A = (3.0485, 2.2868, 1.5463, 0.867)
O_B = (13.2771, 5.7011, 0.3239, 32.9089)
O_C = 0.2508

# S1 (1/angstrom) vs droplet temperature (K): cxi25410 fits, ~2.0 at ambient
S1_TABLE_T = np.array([220.0, 221.0, 223.0, 227.0, 232.0, 250.0, 270.0, 298.0])
S1_TABLE_Q = np.array([1.867, 1.868, 1.851, 1.869, 1.901, 1.972, 1.990, 2.000])

# Ice share of hits vs temperature (K), cxi25410
ICE_SHARE_T = np.array([219.0, 220.0, 221.0, 223.0, 227.0, 270.0])
ICE_SHARE_P = np.array([0.99, 0.97, 0.84, 0.18, 0.002, 0.001])

# Ice Ih (a = 4.518, c = 7.356 A): hkl, q (1/A), multiplicity, powder intensity
ICE_IH = (("100", 1.606, 6, 100.0), ("002", 1.708, 2, 56.0), ("101", 1.819, 12, 62.0),
          ("102", 2.345, 12, 31.0), ("110", 2.781, 6, 66.0), ("103", 3.024, 12, 60.0),
          ("200", 3.212, 6, 9.0), ("112", 3.264, 12, 34.0), ("201", 3.323, 12, 7.0))
# stacking-disordered ("cubic-like") ice: cubic 111/220/311 plus weak hexagonal 100/101
ICE_SD = (("c111", 1.710, 8, 100.0), ("c220", 2.790, 12, 60.0), ("c311", 3.270, 24, 30.0),
          ("h100", 1.606, 6, 20.0), ("h101", 1.819, 12, 15.0))


def oxygen_form_factor(q):
    """Oxygen atomic form factor f_O(q) (electrons), q in 1/angstrom.

    >>> round(float(oxygen_form_factor(0.0)), 3)
    7.999
    """
    s2 = (np.asarray(q, float) / (4.0 * np.pi)) ** 2
    return sum(a * np.exp(-b * s2) for a, b in zip(O_A, O_B)) + O_C


def s1_position(temperature_k):
    """Fitted S1 peak position (1/angstrom) at a droplet temperature, interpolated.

    >>> round(float(s1_position(232.0)), 3)
    1.901
    """
    return np.interp(temperature_k, S1_TABLE_T, S1_TABLE_Q)


def ice_share(temperature_k):
    """Fraction of hits that are ice at a droplet temperature (cxi25410 numbers).

    >>> float(ice_share(221.0))
    0.84
    """
    return np.interp(temperature_k, ICE_SHARE_T, ICE_SHARE_P)


def water_parameters(temperature_k, s1_q=None):
    """Ring parameters at a temperature: dict of s1_q, s1_sigma, s2_q, s2_sigma, s2_height.

    S1 narrows and S2 grows and moves out slightly on supercooling.
    """
    t = float(temperature_k)
    cold = float(np.clip((270.0 - t) / 50.0, 0.0, 1.2))
    return {"s1_q": float(s1_position(t) if s1_q is None else s1_q),
            "s1_sigma": 0.25 - 0.04 * cold, "s2_q": 3.05 + 0.03 * cold,
            "s2_sigma": 0.20, "s2_height": 0.35 + 0.35 * cold}


def _structure_factor(q, s1_peak, p):
    base = 0.06 + 0.94 * (1.0 - np.exp(-(q / 2.6) ** 4))
    return (base + 1.6 * np.exp(-0.5 * ((q - s1_peak) / p["s1_sigma"]) ** 2)
            + p["s2_height"] * np.exp(-0.5 * ((q - p["s2_q"]) / p["s2_sigma"]) ** 2))


def water_profile(q, temperature_k, s1_q=None):
    """Relative water intensity ``f_O(q)^2 S(q)`` on ``q``, peak (at S1) normalized to 1.

    Parameters
    ----------
    q : ndarray
        Momentum transfer grid (1/angstrom), fine enough to resolve the rings (dq <= 0.01).
    temperature_k : float
    s1_q : float, optional
        Override the S1 position (observed peak) from the temperature table.

    Returns
    -------
    profile : ndarray, same shape as q
    params : dict
        :func:`water_parameters` with the structure-factor peak actually used.
    """
    p = water_parameters(temperature_k, s1_q)
    fine = np.linspace(1.0, 3.0, 2001)
    f2 = oxygen_form_factor(fine) ** 2
    peak = p["s1_q"]
    for _ in range(6):   # move the S peak until the product f^2 S peaks at s1_q
        got = fine[np.argmax(f2 * _structure_factor(fine, peak, p))]
        peak += p["s1_q"] - got
    q = np.asarray(q, float)
    prof = oxygen_form_factor(q) ** 2 * _structure_factor(q, peak, p)
    top = np.max(f2 * _structure_factor(fine, peak, p))
    p["s_peak_q"] = float(peak)
    return prof / top, p


def air_profile(q):
    """Relative shape of air/gas and beamline scatter (falls off with q), 1 at q = 0."""
    q = np.asarray(q, float)
    return 0.25 + 0.75 * np.exp(-q / 0.7)


def reflection_table(kind="ih"):
    """Arrays (names, q, multiplicity, per-reflection strength) for ``"ih"`` or ``"sd"`` ice.

    Per-reflection strength is powder intensity / multiplicity (|F|^2), scaled so that the
    Ih 100 reflection is 1; a crystallite picks reflections with probability proportional
    to multiplicity.
    """
    table = ICE_IH if kind == "ih" else ICE_SD
    names = [t[0] for t in table]
    q = np.array([t[1] for t in table])
    mult = np.array([t[2] for t in table], float)
    strength = np.array([t[3] for t in table]) / mult / (100.0 / 6.0)
    return names, q, mult, strength


def draw_ice_spots(rng, n_crystallites, ice_strength, kind="ih", mean_reflections=2.5):
    """Random Bragg spots of ``n_crystallites`` crystallites.

    Each crystallite shows ``1 + Poisson(mean_reflections - 1)`` reflections at random
    azimuths (it is a single crystal in a random orientation, cut by the Ewald sphere);
    peak height = ice_strength * |F|^2 * lognormal partiality. About 20 % of spots are
    streaks (elongated tangentially), as seen from strained or mosaic crystallites.

    Returns
    -------
    list of dict
        ``q, phi, peak, sigma_r, sigma_t, hkl`` per spot (peak in photons per pixel before
        polarization / solid angle; sigmas in pixels).
    """
    names, q, mult, strength = reflection_table(kind)
    prob = mult / mult.sum()
    spots = []
    broad = 1.4 if kind == "sd" else 1.0
    for _ in range(int(n_crystallites)):
        n_refl = 1 + rng.poisson(max(mean_reflections - 1.0, 0.0))
        picks = rng.choice(len(q), size=n_refl, p=prob)
        size = rng.uniform(0.8, 2.0)           # crystallite-dependent spot size (px)
        for k in picks:
            streak = rng.random() < 0.2
            sigma_r = size * broad
            sigma_t = sigma_r * (rng.uniform(2.0, 5.0) if streak else rng.uniform(0.8, 1.25))
            spots.append({"hkl": names[k],
                          "q": float(q[k] * (1.0 + rng.normal(0.0, 0.0015))),
                          "phi": float(rng.uniform(-np.pi, np.pi)),
                          "peak": float(ice_strength * strength[k]
                                        * rng.lognormal(0.0, 0.6)),
                          "sigma_r": float(sigma_r), "sigma_t": float(sigma_t)})
    return spots


def render_spot(geometry, spot, scale_map=None):
    """Expected photons of one spot as ``(index, patch)`` into a frame, or None if the spot
    falls in a gap or off the detector.

    ``index`` is a numpy index (module, ss-slice, fs-slice) of the frame; ``patch`` the
    expected photons there (Gaussian, radial/tangential sigmas in pixels), multiplied by
    ``scale_map`` (e.g. polarization * solid angle) at the spot centre.
    """
    lam = geometry.wavelength
    sin_t = spot["q"] * lam / (4.0 * np.pi)
    if not 0.0 < sin_t < 1.0:
        return None
    tth = 2.0 * np.arcsin(sin_t)
    if tth >= np.pi / 2:
        return None
    r = geometry.distance * np.tan(tth)
    ux, uy = np.cos(spot["phi"]), np.sin(spot["phi"])
    hit = geometry.locate(r * ux, r * uy)
    if hit is None:
        return None
    module, ss, fs, panel = hit
    half = int(np.ceil(3.5 * max(spot["sigma_r"], spot["sigma_t"]))) + 1
    s_lo = max(int(round(ss)) - half, panel.ss0)
    s_hi = min(int(round(ss)) + half + 1, panel.ss1)
    f_lo = max(int(round(fs)) - half, panel.fs0)
    f_hi = min(int(round(fs)) + half + 1, panel.fs1)
    dss = (np.arange(s_lo, s_hi) - ss)[:, None]
    dfs = (np.arange(f_lo, f_hi) - fs)[None, :]
    pix = float(np.linalg.norm(panel.fs_vec))
    dx = (dss * panel.ss_vec[0] + dfs * panel.fs_vec[0]) / pix
    dy = (dss * panel.ss_vec[1] + dfs * panel.fs_vec[1]) / pix
    d_rad = dx * ux + dy * uy
    d_tan = -dx * uy + dy * ux
    patch = spot["peak"] * np.exp(-0.5 * ((d_rad / spot["sigma_r"]) ** 2
                                         + (d_tan / spot["sigma_t"]) ** 2))
    index = (slice(s_lo, s_hi), slice(f_lo, f_hi))
    if module is not None:
        index = (module,) + index
    if scale_map is not None:
        centre = (int(np.clip(round(ss), panel.ss0, panel.ss1 - 1)),
                  int(np.clip(round(fs), panel.fs0, panel.fs1 - 1)))
        if module is not None:
            centre = (module,) + centre
        patch = patch * float(scale_map[centre])
    return index, patch
