"""Per-image parameters of the synthetic faces: every number the renderer needs.

:func:`image_params` turns ages and subject traits into geometry, age cues and nuisances;
:func:`render_params` adds what depends on the image size; :func:`windows` and
:func:`to_torch` prepare one chunk for :func:`.render.render`.

Face coordinates: x to the right, y down, the head roughly spans [-0.8, 0.8]; the image
spans [-1, 1] before the pose transform.

The steps of :func:`image_params` draw from one generator in a fixed order: reordering them,
or the draws inside them, changes every face (and the recorded checksums in tests/data).
"""

from __future__ import annotations

import numpy as np
import torch

from agelab.data.synth.shapes import n_tex
from agelab.data.synth.traits import lerp, sigmoid, smoothstep

Params = dict[str, np.ndarray]


def image_params(
    ages: np.ndarray,
    subjects: np.ndarray,
    traits: dict[str, np.ndarray],
    occluder_prob: float,
    rng: np.random.Generator,
) -> Params:
    """Every number the renderer needs, per image: geometry from age cues, then nuisances
    (float32, C-contiguous)."""
    n = len(ages)
    S = {k: v[subjects] for k, v in traits.items()}
    age = ages.astype(np.float64)
    p: Params = {}
    # Growth: maturity 0 (newborn) → 1 (adult), a smooth saturating function of age.
    dev_age = np.maximum(age + S["dev_shift"], 0.0)
    m = 1.0 - np.exp(-((dev_age / 8.5) ** 1.4))
    # Late-life changes driven by a personal "skin age".
    skin_age = age * S["skin_rate"]
    sag = smoothstep(skin_age, 45.0, 90.0)
    _head(p, S, m, sag)
    smile = _face_features(p, S, m, sag, skin_age, rng, n)
    grey = _brows_and_hair(p, S, age, m, rng, n)
    _skin_ageing(p, S, m, skin_age, smile, rng, n)
    _pose_and_light(p, rng, n)
    _scene(p, occluder_prob, rng, n)
    _colours(p, S, grey)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in p.items()}


# ---------------------------------------------------------------------------- age cues


def _head(p: Params, S: Params, m: np.ndarray, sag: np.ndarray) -> None:
    """Head: the cranium ellipse is big and round for children; the jaw/face ellipse below
    it grows longer (chin moves down) with maturity, and sags/widens with old age."""
    p["cr_cy"] = lerp(-0.13, -0.17, m)
    p["cr_a"] = lerp(0.64, 0.54, m)
    p["cr_b"] = lerp(0.65, 0.60, m)
    p["jaw_cy"] = lerp(0.13, 0.10, m)
    p["jaw_a"] = lerp(0.57, 0.47, m) * lerp(1.0, S["jaw_w"], m) + 0.03 * sag
    p["jaw_b"] = lerp(0.54, 0.66, m) * lerp(1.0, S["face_len"], m) + 0.02 * sag


def _face_features(
    p: Params,
    S: Params,
    m: np.ndarray,
    sag: np.ndarray,
    skin_age: np.ndarray,
    rng: np.random.Generator,
    n: int,
) -> np.ndarray:
    """Eyes, nose, mouth, ears, neck and shoulders; returns the smile (expression)."""
    chin = p["jaw_cy"] + p["jaw_b"]
    # Eyes: low in the head and large for children; adult eyes sit at mid-head.
    p["eye_y"] = lerp(0.13, -0.02, m)
    p["eye_x"] = lerp(0.215, 0.205, m) * S["eye_sep"]
    p["eye_a"] = lerp(0.105, 0.094, m) * S["eye_size"]
    p["eye_b"] = lerp(0.070, 0.046, m) * S["eye_size"]
    p["iris_r"] = lerp(0.062, 0.044, m) * S["eye_size"]
    # Upper lid: fraction of the eye height covered (droops with age).
    p["lid"] = 0.05 + 0.07 * m + 0.32 * smoothstep(skin_age, 40.0, 90.0) + rng.uniform(0, 0.1, n)
    # Nose and mouth positions follow the (lengthening) lower face; the nose keeps
    # growing a little in old age.
    face_h = chin - p["eye_y"]
    p["nose_y"] = p["eye_y"] + face_h * lerp(0.33, 0.38, m) + 0.02 * sag
    p["nose_w"] = lerp(0.045, 0.065, m) * S["nose_w"]
    p["mouth_y"] = p["eye_y"] + face_h * lerp(0.61, 0.62, m)
    p["mouth_w"] = lerp(0.10, 0.155, m) * S["mouth_w"]
    p["lip_t"] = lerp(0.022, 0.026, m) * S["lip_t"] * (1 - 0.45 * sag)
    smile = np.clip(rng.normal(0.25, 0.45, n), -0.4, 1.0)  # expression (nuisance)
    p["mouth_curve"] = 0.03 * sag - 0.035 * smile  # >0: corners down
    # Ears grow slowly through life.
    p["ear_x"] = p["cr_a"] * lerp(0.97, 0.93, m)
    p["ear_y"] = p["eye_y"] + 0.05
    p["ear_a"] = 0.065 * S["ear"] * (1 + 0.1 * sag)
    p["ear_b"] = lerp(0.10, 0.13, m) * S["ear"] * (1 + 0.12 * sag)
    p["neck_w"] = lerp(0.22, 0.27, m) + 0.03 * S["male"] * m
    p["chin"] = chin
    p["shoulder_a"] = lerp(0.75, 1.05, m)
    return smile


def _brows_and_hair(
    p: Params, S: Params, age: np.ndarray, m: np.ndarray, rng: np.random.Generator, n: int
) -> np.ndarray:
    """Eyebrows, hair density, hairline, greying and beard; returns the hair's grey share."""
    # Eyebrows: faint on babies, grey later than the hair.
    p["brow_y"] = p["eye_y"] - p["eye_b"] - lerp(0.055, 0.075, m)
    p["brow_x"] = p["eye_x"] + 0.01
    p["brow_w"] = p["eye_a"] * 1.25
    p["brow_t"] = lerp(0.010, 0.016, m) * S["brow_t"]
    p["brow_arch"] = S["brow_arch"]
    p["brow_alpha"] = lerp(0.25, 0.95, m)
    # Hair: density (babies have sparse hair), hairline (receding), greying.
    p["hair_dens"] = lerp(0.15, 1.0, smoothstep(age, 0.0, 5.0))
    recede = S["bald"] * smoothstep(age, S["bald_onset"], S["bald_onset"] + 35.0)
    base_line = p["cr_cy"] - p["cr_b"] * 0.5 + S["fringe"] * m
    p["hair_h0"] = base_line - 0.55 * recede  # the hairline's height at the midline
    p["hair_side"] = lerp(-0.05, 0.0, recede) + 0.03 * rng.standard_normal(n)  # at |x|=0.5
    p["hair_temple"] = 0.16 * np.clip(recede * 2.0, 0, 1) * (1 - recede)  # M-shaped recession
    p["hair_vol"] = S["hair_vol"] * (1 - 0.85 * recede) * p["hair_dens"]
    p["hair_len"] = np.where(age < 3, np.minimum(S["hair_len"], -0.2), S["hair_len"])
    grey = S["grey_max"] * sigmoid((age - S["grey_onset"]) / (S["grey_width"] / 2.0))
    # Some people dye their hair (in most of their photos): the hair cue is gone, the
    # eyebrows and skin still tell.
    dyed = (rng.random(n) < 0.8) * S["dyes"]
    grey = grey * (1.0 - 0.9 * dyed)
    p["grey"] = grey
    p["brow_grey"] = sigmoid((age - S["grey_onset"] - 12.0) / (S["grey_width"] / 2.0))
    p["beard"] = (
        S["beard"] * smoothstep(age, 14.0, 24.0) * (rng.random(n) < 0.7) * rng.uniform(0.4, 1.0, n)
    )
    return grey


def _skin_ageing(
    p: Params,
    S: Params,
    m: np.ndarray,
    skin_age: np.ndarray,
    smile: np.ndarray,
    rng: np.random.Generator,
    n: int,
) -> None:
    """Skin ageing: each wrinkle family has its own onset age; 0 = absent, 1 = full."""
    p["w_fore"] = smoothstep(skin_age, 22.0, 72.0)
    p["w_crow"] = smoothstep(skin_age, 28.0, 75.0)
    p["w_naso"] = smoothstep(skin_age, 20.0, 78.0)
    p["w_mario"] = smoothstep(skin_age, 45.0, 85.0)
    p["w_bags"] = smoothstep(skin_age, 38.0, 85.0)
    p["w_neck"] = smoothstep(skin_age, 40.0, 85.0)
    p["spots"] = smoothstep(skin_age, 48.0, 92.0) * S["spots"]
    p["smile"] = smile
    p["blush"] = 0.25 * (1 - m) + 0.06 * rng.random(n)  # rosy cheeks on children


# ---------------------------------------------------------------------------- nuisances


def _pose_and_light(p: Params, rng: np.random.Generator, n: int) -> None:
    # Pose: in-plane rotation, shift, scale.
    rot = np.clip(rng.normal(0.0, 0.12, n), -0.35, 0.35)
    p["cos"], p["sin"] = np.cos(rot), np.sin(rot)
    p["shift_x"] = rng.uniform(-0.1, 0.1, n)
    p["shift_y"] = rng.uniform(-0.08, 0.1, n)
    p["scale"] = np.exp(np.clip(rng.normal(0.0, 0.08, n), -0.2, 0.2))
    p["gaze_x"] = rng.normal(0.0, 0.012, n)
    p["gaze_y"] = rng.normal(0.0, 0.006, n)
    # Lighting: unit direction (mostly frontal), ambient/diffuse mix, intensity, tint.
    az = rng.uniform(0, 2 * np.pi, n)
    el = rng.uniform(0.35, 1.0, n)  # sideways component of the light
    p["light_x"] = el * np.cos(az) * 0.8
    p["light_y"] = el * np.sin(az) * 0.8
    p["light_z"] = np.sqrt(np.maximum(1.0 - p["light_x"] ** 2 - p["light_y"] ** 2, 0.05))
    p["diffuse"] = rng.uniform(0.25, 0.6, n)
    p["intensity"] = rng.uniform(0.55, 1.25, n)
    # White balance: mostly along the warm/cool axis, a little green/magenta.
    temp = rng.normal(0.0, 0.08, (n, 1)) * np.array([1.0, 0.1, -1.0])
    p["tint"] = np.exp(temp + 0.025 * rng.standard_normal((n, 3)))


def _scene(p: Params, occluder_prob: float, rng: np.random.Generator, n: int) -> None:
    """Background, clothing, camera and occluder."""
    # Background: base colour + linear gradient + blotchy low-frequency texture.
    p["bg"] = rng.uniform(0.1, 0.9, (n, 3)) * rng.uniform(0.5, 1.0, (n, 1)) + rng.uniform(
        0.0, 0.3, (n, 1)
    )
    p["bg_gx"] = rng.normal(0.0, 0.15, n)
    p["bg_gy"] = rng.normal(0.0, 0.15, n)
    p["bg_tex"] = rng.uniform(0.0, 0.2, n) * (rng.random(n) < 0.6)
    p["shirt"] = rng.uniform(0.05, 0.9, (n, 3))
    # Camera: defocus (box blur mix) on some images, sensor noise on all.
    p["blur"] = (rng.random(n) < 0.25) * rng.uniform(0.2, 0.8, n)
    p["noise"] = rng.uniform(0.004, 0.04, n)
    # Occluder: 0 none, 1 sunglasses, 2 face mask, 3 random patch.
    occ = rng.random(n) < occluder_prob
    p["occ"] = occ * rng.choice([1, 2, 3], size=n, p=[0.4, 0.25, 0.35])
    p["occ_col"] = np.where(
        (p["occ"] == 1)[:, None], rng.uniform(0.02, 0.15, (n, 3)), rng.uniform(0.1, 0.95, (n, 3))
    )
    p["occ_cx"] = rng.uniform(-0.6, 0.6, n)
    p["occ_cy"] = rng.uniform(-0.6, 0.6, n)
    p["occ_hw"] = rng.uniform(0.1, 0.35, n)
    p["occ_hh"] = rng.uniform(0.1, 0.35, n)


def _colours(p: Params, S: Params, grey: np.ndarray) -> None:
    """Colours that depend on the subject and the age cues."""
    p["skin"] = S["skin"]
    p["lip"] = S["lip"]
    p["iris"] = S["iris"]
    grey_target = lerp(
        np.array([0.52, 0.52, 0.53]), np.array([0.86, 0.86, 0.85]), (grey**2)[:, None]
    )
    p["hair_base"] = S["hair"]
    p["hair_grey"] = grey_target
    p["brow_col"] = lerp(S["hair"] * 0.85, grey_target, (p["brow_grey"] * 0.8)[:, None])


# ------------------------------------------------------------------------- size-dependent

#: Colours the light's colour (white balance) multiplies.
_TINTED = (
    "bg",
    "shirt",
    "hair_base",
    "hair_grey",
    "skin",
    "blush_col",
    "brow_col",
    "sclera",
    "glint",
    "iris",
    "lash",
    "lip",
    "occ_col",
)


def render_params(p: Params, size: int, rng: np.random.Generator) -> None:
    """Add the size-dependent and derived values the renderer reads (in place)."""
    n = len(p["cos"])
    f32 = np.float32
    px = 2.0 / (size * p["scale"])  # one pixel in face units
    p["inv_px"] = (1.0 / px).astype(f32)
    p["inv_hairline"] = (1.0 / np.maximum(px, 0.02)).astype(f32)  # soft hairline
    p["lw"] = np.maximum(0.55 * px, 0.007).astype(f32)  # wrinkle half-width, ≥ ~1 px wide
    p["spacing"] = np.maximum(2.6 * px, 0.045).astype(f32)  # between forehead lines
    _wrinkle_contrasts(p)
    p["nost_a"] = np.full(n, 0.028, f32)
    p["nost_b"] = np.full(n, 0.016, f32)
    p["shoulder_b"] = np.full(n, 0.62, f32)
    p["inv_nx"] = (1.0 / (1.1 * p["cr_a"])).astype(f32)
    # Lighting: light = base + gain · (flat or Lambert term), times intensity.
    p["flat"] = (0.9 * p["light_z"]).astype(f32)
    p["light_gain"] = (255.0 * 1.25 * p["diffuse"] * p["intensity"]).astype(f32)
    p["light_base"] = (255.0 * (1.0 - p["diffuse"]) * p["intensity"]).astype(f32)
    p["noise"] = (255.0 * p["noise"]).astype(f32)
    # Constant colours, and colours derived from the subject's.
    p["sclera"] = np.tile(np.array([0.93, 0.92, 0.90], f32), (n, 1))
    p["glint"] = np.ones((n, 3), f32)
    p["lash"] = np.tile(np.array([0.08, 0.06, 0.06], f32), (n, 1))
    p["blush_col"] = np.clip(p["skin"] * np.array([1.08, 0.72, 0.72]) + [0.06, 0, 0], 0, 1).astype(
        f32
    )
    # The light's colour (white balance) multiplies every colour.
    for name in _TINTED:
        p[name] = (p[name] * p["tint"]).astype(f32)
    del p["tint"]
    # Texture picks.
    for name in ("i_coarse", "i_fine", "i_streak", "i_streak2", "i_chroma"):
        p[name] = rng.integers(0, n_tex(size), n).astype(np.int64)


def _wrinkle_contrasts(p: Params) -> None:
    """Wrinkle contrasts (fraction of darkening) and extents from the age cues."""
    f32 = np.float32
    p["n_lines"] = (4.2 * p["w_fore"]).astype(f32)
    p["c_fore"] = (0.3 * np.sqrt(p["w_fore"])).astype(f32)
    p["fore_len"] = (0.18 + 0.14 * p["w_fore"]).astype(f32)
    p["c_crow"] = (0.32 * p["w_crow"]).astype(f32)
    p["crow_more"] = np.clip(2.0 * p["w_crow"] - 0.6, 0, 1).astype(f32)
    p["crow_len"] = (0.05 + 0.06 * p["w_crow"]).astype(f32)
    p["c_bags"] = (0.25 * p["w_bags"]).astype(f32)
    p["c_naso"] = (0.28 * p["w_naso"] + 0.08 * np.maximum(p["smile"], 0)).astype(f32)
    p["c_mario"] = (0.3 * p["w_mario"]).astype(f32)
    p["c_jowl"] = (0.22 * p["w_mario"]).astype(f32)
    p["c_neck"] = (0.25 * p["w_neck"]).astype(f32)


# --------------------------------------------------------------------------- one chunk


def to_torch(p: Params, s: np.ndarray) -> dict[str, torch.Tensor]:
    """The parameters of the images ``s`` as broadcastable tensors: [B,1,1], colours
    [B,3,1,1], texture picks ``i_*`` [B] int64."""
    out = {}
    for k, v in p.items():
        t = torch.from_numpy(v[s])
        if k.startswith("i_"):
            out[k] = t.long()
        else:
            out[k] = t.view(-1, 3, 1, 1) if t.ndim == 2 else t.view(-1, 1, 1)
    return out


def _pixel_box(
    p: Params,
    s: np.ndarray,
    size: int,
    x_half: np.ndarray,
    y0: np.ndarray,
    y1: np.ndarray,
) -> tuple[int, int, int, int]:
    """Rows/cols (r0, r1, c0, c1) covering the face-coordinate boxes |x| ≤ x_half,
    y0 ≤ y ≤ y1 of every image of a chunk, after each image's pose."""
    c, sn, sc = p["cos"][s], p["sin"][s], p["scale"][s]
    xb = np.stack([-x_half[s], x_half[s], -x_half[s], x_half[s]])
    yb = np.stack([y0[s], y0[s], y1[s], y1[s]])
    uu = (p["shift_x"][s] + sc * (c * xb - sn * yb) + 1.0) * (size / 2.0)
    vv = (p["shift_y"][s] + sc * (sn * xb + c * yb) + 1.0) * (size / 2.0)
    r0 = int(np.clip(np.floor(vv.min()) - 2, 0, size - 1))
    c0 = int(np.clip(np.floor(uu.min()) - 2, 0, size - 1))
    r1 = int(np.clip(np.ceil(vv.max()) + 2, r0 + 1, size))
    c1 = int(np.clip(np.ceil(uu.max()) + 2, c0 + 1, size))
    return r0, r1, c0, c1


def windows(p: Params, s: np.ndarray, size: int) -> dict[str, tuple[int, int, int, int]]:
    """Pixel windows of the local features for the chunk of images ``s`` (see render)."""
    fore_top = p["brow_y"] - 0.08 - 5.5 * p["spacing"]
    eyes_top = p["brow_y"] - p["brow_arch"] - p["brow_t"] - 0.03
    eyes_bot = p["eye_y"] + 1.7 * p["eye_b"] + 1.2 * p["eye_a"] ** 2 + p["lw"] + 0.03
    lower_x = np.maximum(p["mouth_w"] + 0.15, p["eye_x"] + 0.2)
    lower_top = np.minimum(p["eye_y"] + 0.03, p["nose_y"] - 0.2)
    return {
        "forehead": _pixel_box(p, s, size, p["fore_len"] + 0.1, fore_top, p["brow_y"]),
        "eyes": _pixel_box(p, s, size, p["eye_x"] + p["eye_a"] + 0.16, eyes_top, eyes_bot),
        "lower": _pixel_box(p, s, size, lower_x, lower_top, p["mouth_y"] + 0.2),
        "jaw": _pixel_box(p, s, size, p["jaw_a"] + 0.05, p["nose_y"], p["chin"] + 0.06),
        "body": _pixel_box(p, s, size, p["shoulder_a"] + 0.1, p["chin"] + 0.1, p["chin"] + 3.0),
        "ears": _pixel_box(
            p,
            s,
            size,
            p["ear_x"] + p["ear_a"] + 0.02,
            p["ear_y"] - p["ear_b"] - 0.02,
            p["ear_y"] + p["ear_b"] + 0.02,
        ),
        "neck": _pixel_box(
            p, s, size, np.maximum(0.3, p["neck_w"]) + 0.05, p["chin"] - 0.12, p["chin"] + 0.26
        ),
    }
