"""Draw one chunk of synthetic faces: :func:`render`, a sequence of named layers.

Each layer composites onto the chunk's float image (0–255 after lighting) or adds to the
skin's ``dark`` map, in the order :func:`render` lists them; local features (eyes, mouth,
wrinkles…) are only evaluated in the pixel window that holds them (see
:func:`.params.windows`). Layers work in place on shared tensors, so their order is part of
the output: moving one changes the faces (and the recorded checksums in tests/data).
The only random draw is the sensor noise in :func:`_camera`, from the chunk's generator.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from agelab.data.synth.shapes import band_, below, between, cov_, ell_fast, ellipse

Tensors = dict[str, torch.Tensor]
Box = tuple[int, int, int, int]


def render(P: Tensors, size: int, win: dict[str, Box], tex: Tensors, gen: torch.Generator):
    """Draw one chunk → uint8 [B, 3, size, size].

    P: per-image parameters ([B,1,1], colours [B,3,1,1], texture picks [B] int64);
    win: pixel windows (r0, r1, c0, c1) of the local features for this chunk;
    tex: texture banks; gen: the chunk's pixel-noise generator.
    """
    c = _Canvas(P, size, win)
    img = _background(c, P, tex)
    _shoulders(img, c, P)
    hair_rgb, strand = _hair_colour(P, tex)
    back = _back_hair(img, c, P, hair_rgb)
    skin = _skin_masks(c, P)
    dark = _skin_marks(skin, P, tex)
    _forehead_lines(dark, c, P)
    _eye_lines(dark, c, P)
    _lower_face_lines(dark, c, P)
    _neck_lines(dark, skin.head, c, P)
    _paint_skin(img, dark, skin.mask, P)
    _rosy_cheeks(img, skin.mask, c, P)
    front = _front_hair(img, skin.d_cr, hair_rgb, c, P)
    _beard(img, skin.d_jaw, hair_rgb, strand, c, P)
    _eyebrows(img, c, P)
    _eyes(img, c, P)
    _mouth(img, c, P)
    _occluders(img, c, P)
    _lighting(img, torch.maximum(skin.mask, torch.maximum(front, back)), c, P)
    return _camera(img, P, tex, gen)


class _Canvas:
    """A chunk's pixel grid in face coordinates (each image's pose applied): the full frame
    (``x``, ``y`` and ``xs`` = |x|: most features are left/right symmetric, drawn on |x|)
    and, through :meth:`at`, each feature window's own coordinates."""

    def __init__(self, P: Tensors, size: int, win: dict[str, Box]):
        self.g = (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
        # Pose: face coordinates x = (cos·(u − sx) + sin·(v − sy)) / scale, y likewise.
        self.ca, self.sb = P["cos"] / P["scale"], P["sin"] / P["scale"]
        self.ox = -(self.ca * P["shift_x"] + self.sb * P["shift_y"])
        self.oy = -(self.ca * P["shift_y"] - self.sb * P["shift_x"])
        self.inv = P["inv_px"]  # 1 / (one pixel in face units)
        self.inv_soft = self.inv / 1.5  # slightly soft edges for hair and clothing
        self.lw = P["lw"]  # half-width of a wrinkle line
        self.win = win
        self.size = size
        self.x, self.y, self.xs = self._coords(0, size, 0, size)
        self.u, self.v = self.g.view(1, 1, size), self.g.view(1, size, 1)  # image coordinates
        self._windows: dict[str, tuple[torch.Tensor, ...]] = {}

    def _coords(self, r0: int, r1: int, c0: int, c1: int) -> tuple[torch.Tensor, ...]:
        uu, vv = self.g[c0:c1].view(1, 1, -1), self.g[r0:r1].view(1, -1, 1)
        x = (self.ca * uu + self.ox) + self.sb * vv
        y = (self.ca * vv + self.oy) - self.sb * uu
        return x, y, x.abs()

    def at(self, name: str) -> tuple[torch.Tensor, ...]:
        """(x, y, |x|) in the window ``name``, computed once per chunk (never modified)."""
        if name not in self._windows:
            self._windows[name] = self._coords(*self.win[name])
        return self._windows[name]


class _Skin(NamedTuple):
    head: torch.Tensor  # coverage of cranium ∪ jaw
    neck: torch.Tensor
    mask: torch.Tensor  # head ∪ neck ∪ ears
    d_cr: torch.Tensor  # signed distances to the cranium and the jaw ellipses
    d_jaw: torch.Tensor


# ------------------------------------------------------------------- background and hair


def _background(c: _Canvas, P: Tensors, tex: Tensors) -> torch.Tensor:
    """Colour × (1 + linear gradient + blotchy texture), in image coordinates."""
    field = (P["bg_gx"] * c.u + 1.0) + P["bg_gy"] * c.v
    field.addcmul_(tex["coarse"][P["i_coarse"]], P["bg_tex"])
    return P["bg"] * field.unsqueeze(1)


def _shoulders(img: torch.Tensor, c: _Canvas, P: Tensors) -> None:
    """Shoulders (clothing), in the rows below the chin."""
    r0, r1, c0, c1 = c.win["body"]
    d_sh = ell_fast(
        c.x[:, r0:r1, c0:c1],
        c.y[:, r0:r1, c0:c1],
        None,
        P["chin"] + 0.78,
        P["shoulder_a"],
        P["shoulder_b"],
    )
    img[:, :, r0:r1, c0:c1].lerp_(P["shirt"], cov_(d_sh, c.inv_soft).unsqueeze(1))


def _hair_colour(P: Tensors, tex: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Hair colour: strands (streak texture), greyed strand by strand (salt and pepper).
    Returns the colour [B,3,S,S] and the strand shading [B,S,S] (the beard reuses it)."""
    thr = tex["streak"][P["i_streak"]]
    grey_m = thr.neg_().add_(P["grey"]).mul_(6.0).add_(0.5).clamp_(0.0, 1.0)
    hair_rgb = torch.lerp(P["hair_base"], P["hair_grey"], grey_m.unsqueeze(1))
    strand = tex["streak"][P["i_streak2"]].mul_(0.3).add_(0.72)  # strand shading
    hair_rgb.mul_(strand.unsqueeze(1))
    return hair_rgb, strand


def _back_hair(img: torch.Tensor, c: _Canvas, P: Tensors, hair_rgb: torch.Tensor):
    """Volume around the cranium, and long hair falling behind the neck; returns its
    coverage."""
    x, y, xs = c.x, c.y, c.xs
    vol = P["hair_vol"]
    back = cov_(
        ell_fast(x, y, None, P["cr_cy"] + 0.02, P["cr_a"] + vol, P["cr_b"] + vol), c.inv_soft
    )
    d_long = torch.maximum(xs - (P["cr_a"] + 0.7 * vol), y - P["hair_len"])
    d_long = torch.maximum(d_long, P["cr_cy"] - y)
    back = torch.maximum(back, cov_(d_long, c.inv_soft)).mul_(P["hair_dens"])
    img.lerp_(hair_rgb, back.unsqueeze(1))
    return back


# -------------------------------------------------------------------------------- skin


def _skin_masks(c: _Canvas, P: Tensors) -> _Skin:
    """Head = cranium ∪ jaw/face ellipse; ears and neck share the skin colour."""
    x, y, xs, inv = c.x, c.y, c.xs, c.inv
    d_cr = ell_fast(x, y, None, P["cr_cy"], P["cr_a"], P["cr_b"])
    d_jaw = ell_fast(x, y, None, P["jaw_cy"], P["jaw_a"], P["jaw_b"])
    head = cov_(torch.minimum(d_cr, d_jaw), inv)
    neck = cov_(torch.maximum(xs - P["neck_w"], P["jaw_cy"] - y), inv)
    skin_m = torch.maximum(head, neck)
    r0, r1, c0, c1 = c.win["ears"]
    ear = ell_fast(
        xs[:, r0:r1, c0:c1], y[:, r0:r1, c0:c1], P["ear_x"], P["ear_y"], P["ear_a"], P["ear_b"]
    )
    sk = skin_m[:, r0:r1, c0:c1]
    torch.maximum(sk, cov_(ear, inv), out=sk)
    return _Skin(head, neck, skin_m, d_cr, d_jaw)


def _skin_marks(skin: _Skin, P: Tensors, tex: Tensors) -> torch.Tensor:
    """The ``dark`` map, which multiplies the skin colour by (1 − dark): shadows, wrinkles,
    folds, spots. Starts with the neck's shadow and the age spots."""
    dark = skin.head.neg().add_(1.0).mul_(skin.neck).mul_(0.22)  # the neck is in the jaw's shadow
    # Age spots and blotchy pigmentation: a smooth texture, its peaks thresholded.
    blot = tex["fine"][P["i_fine"]]
    spots = (blot - 1.3).mul_(3.0).clamp_(0.0, 1.0).mul_(0.25).add_(blot, alpha=0.06)
    dark.addcmul_(spots, P["spots"])
    return dark


def _forehead_lines(dark: torch.Tensor, c: _Canvas, P: Tensors) -> None:
    """Parallel curves above the brows; their number (1 → 4) and contrast grow with age.
    t counts line spacings upwards from the brows."""
    r0, r1, c0, c1 = c.win["forehead"]
    xf, yf, xsf = c.at("forehead")
    spacing = P["spacing"]
    yy = yf - 0.25 * xf * xf + 0.012 * torch.sin(9.0 * xf + P["phase"])
    t = (P["brow_y"] - 0.04 - yy).mul_(1.0 / spacing)
    k = torch.round(t)
    line_a = (P["n_lines"] + 1.0 - k).clamp_(0.0, 1.0).mul_(k >= 1)
    fore = band_((t - k).mul_(spacing), c.lw, c.inv).mul_(line_a)
    fore.mul_(below(xsf, P["fore_len"], 0.08))
    dark[:, r0:r1, c0:c1].addcmul_(fore, P["c_fore"])


def _eye_lines(dark: torch.Tensor, c: _Canvas, P: Tensors) -> None:
    """Eye window: crow's feet, eye bags, lid creases."""
    r0, r1, c0, c1 = c.win["eyes"]
    _, yu, xsu = c.at("eyes")
    lw, inv = c.lw, c.inv
    dk = dark[:, r0:r1, c0:c1]
    # Crow's feet: 1–3 short rays fanning out from the outer eye corner.
    dxc = xsu - (P["eye_x"] + P["eye_a"] + 0.015)
    dy = yu - P["eye_y"]
    crow = band_(dy.clone(), lw, inv)
    more = band_(dy + 0.5 * dxc, lw, inv).add_(band_(dy - 0.5 * dxc, lw, inv))
    crow.addcmul_(more, P["crow_more"]).mul_(between(dxc, 0.0, P["crow_len"], 0.02))
    dk.addcmul_(crow, P["c_crow"])
    # Under-eye bags: an arc below each eye.
    dxe = xsu - P["eye_x"]
    bag = band_(dy - P["eye_b"] * 1.7 - 1.2 * dxe * dxe, 1.3 * lw, inv)
    bag.mul_(below(dxe.abs(), P["eye_a"], 0.03))
    dk.addcmul_(bag, P["c_bags"])
    # Upper-lid crease: an arc above the eye, drawn as a soft shadow.
    d_crease = ellipse(
        xsu, yu, P["eye_x"], P["eye_y"] - 0.005, 1.05 * P["eye_a"], 1.55 * P["eye_b"]
    )
    dk.add_(band_(d_crease, 0.8 * lw, inv).mul_(dy < 0).mul_(0.22))


def _lower_face_lines(dark: torch.Tensor, c: _Canvas, P: Tensors) -> None:
    """Lower face window: nose, nasolabial folds, marionette lines."""
    r0, r1, c0, c1 = c.win["lower"]
    _, yl, xsl = c.at("lower")
    lw, inv = c.lw, c.inv
    dk = dark[:, r0:r1, c0:c1]
    # Nasolabial folds: from the nose wing curving down past the mouth corner; deeper with
    # age and with a smile.
    y0, y1 = P["nose_y"] - 0.04, P["mouth_y"] + 0.07
    fy = (yl - y0).mul_(1.0 / (y1 - y0))
    fold_x = (P["nose_w"] + 0.045) + (P["mouth_w"] - P["nose_w"]) * fy - 0.03 * fy * fy
    naso = band_(xsl - fold_x, 1.2 * lw, inv).mul_(between(fy, 0.0, 1.0, 0.15))
    dk.addcmul_(naso, P["c_naso"])
    # Marionette lines: from the mouth corners down towards the jaw.
    my = yl - P["mouth_y"]
    mario = band_(xsl - P["mouth_w"] - 0.012 - 0.12 * my, lw, inv)
    dk.addcmul_(mario.mul_(between(my, 0.02, 0.17, 0.03)), P["c_mario"])
    # Nose: nostrils and the shaded sides of the bridge (the nose lengthens with age).
    nost = cov_(ellipse(xsl, yl, P["nose_w"], P["nose_y"], P["nost_a"], P["nost_b"]), inv)
    dk.add_(nost.mul_(0.55))
    bridge_x = 0.055 + (P["nose_w"] - 0.03) * ((yl - P["eye_y"]) / (P["nose_y"] - P["eye_y"]))
    bridge = band_(xsl - bridge_x, 1.5 * lw, inv)
    dk.add_(bridge.mul_(between(yl, P["eye_y"] + 0.04, P["nose_y"] - 0.02, 0.04)).mul_(0.1))


def _neck_lines(dark: torch.Tensor, head: torch.Tensor, c: _Canvas, P: Tensors) -> None:
    """Neck window: a jowl / double-chin line under the chin, and neck lines."""
    r0, r1, c0, c1 = c.win["neck"]
    xn, yn, xsn = c.at("neck")
    lw, inv = c.lw, c.inv
    dk = dark[:, r0:r1, c0:c1]
    dj = band_(yn - P["chin"] + 0.06 + 0.5 * xn * xn, 1.5 * lw, inv)
    dk.addcmul_(dj.mul_(below(xsn, 0.22, 0.06)), P["c_jowl"])
    tn = (yn - P["chin"] - 0.05).mul_(1.0 / 0.06)
    kn = torch.round(tn)
    nl = band_((tn - kn).mul_(0.06), lw, inv).mul_(between(tn, 0.5, 2.5, 0.3))
    nl.mul_(below(xsn, P["neck_w"] - 0.05, 0.05)).mul_(1.0 - head[:, r0:r1, c0:c1])
    dk.addcmul_(nl, P["c_neck"])


def _paint_skin(img: torch.Tensor, dark: torch.Tensor, mask: torch.Tensor, P: Tensors) -> None:
    """Skin colour = tone × (1 − dark), composited over everything drawn so far."""
    shade = dark.clamp_(max=0.8).neg_().add_(1.0).unsqueeze(1)
    img.lerp_(P["skin"] * shade, mask.unsqueeze(1))


def _rosy_cheeks(img: torch.Tensor, mask: torch.Tensor, c: _Canvas, P: Tensors) -> None:
    """Rosy cheeks (children): a soft red glow on the cheeks."""
    r0, r1, c0, c1 = c.win["lower"]
    _, yl, xsl = c.at("lower")
    cheek = ((xsl - P["eye_x"]) ** 2).add_((yl - P["nose_y"]) ** 2).mul_(-1.0 / 0.012).exp_()
    cheek.mul_(P["blush"]).mul_(mask[:, r0:r1, c0:c1])
    img[:, :, r0:r1, c0:c1].lerp_(P["blush_col"], cheek.unsqueeze(1))


# ------------------------------------------------------------------- hair over the face


def _front_hair(img, d_cr: torch.Tensor, hair_rgb: torch.Tensor, c: _Canvas, P: Tensors):
    """Inside the cranium above the hairline; returns its coverage. The hairline is a
    parabola through hair_h0 (midline) and hair_side (at |x| = 0.5) with M-shaped temple
    recession. Consumes ``d_cr`` (modified in place)."""
    xs = c.xs
    line = torch.addcmul(P["hair_h0"], xs * xs, (P["hair_side"] - P["hair_h0"]) * 4.0)
    bump = ((xs - 0.22) * (1.0 / 0.11)) ** 2
    bump = bump.neg_().add_(1.0).clamp_(min=0.0)
    line.addcmul_(bump.mul_(bump), P["hair_temple"], value=-1.0)
    d_front = torch.maximum(d_cr.sub_(0.02), c.y - line)
    front = cov_(d_front, P["inv_hairline"]).mul_(P["hair_dens"])
    img.lerp_(hair_rgb, front.unsqueeze(1))
    return front


def _beard(img, d_jaw, hair_rgb, strand, c: _Canvas, P: Tensors) -> None:
    """Beard stubble: the lower face of some adult men, hair-coloured and greying with it."""
    r0, r1, c0, c1 = c.win["jaw"]
    _, yj, _ = c.at("jaw")
    d_beard = torch.maximum(d_jaw[:, r0:r1, c0:c1] + 0.015, P["nose_y"] + 0.05 - yj)
    beard = cov_(d_beard, 1.0 / (0.04 + 1.0 / c.inv)).mul_(P["beard"])
    beard.mul_(strand[:, r0:r1, c0:c1] - 0.3)
    img[:, :, r0:r1, c0:c1].lerp_(hair_rgb[:, :, r0:r1, c0:c1], beard.unsqueeze(1))


# ------------------------------------------------------------------- eyes and mouth


def _eyebrows(img: torch.Tensor, c: _Canvas, P: Tensors) -> None:
    r0, r1, c0, c1 = c.win["eyes"]
    _, yu, xsu = c.at("eyes")
    bx = (xsu - P["brow_x"]).mul_(1.0 / P["brow_w"])
    brow_c = P["brow_y"] - P["brow_arch"] * (1.0 - bx * bx)
    brow = band_(yu - brow_c, P["brow_t"] * (1.0 - 0.5 * bx.abs()), c.inv)
    brow.mul_(between(bx, -1.0, 1.0, 0.25)).mul_(P["brow_alpha"])
    img[:, :, r0:r1, c0:c1].lerp_(P["brow_col"], brow.unsqueeze(1))


def _eyes(img: torch.Tensor, c: _Canvas, P: Tensors) -> None:
    """Sclera, iris (gaze-shifted), pupil, highlight; the upper lid covers the top; a lash
    line along the lid edge."""
    r0, r1, c0, c1 = c.win["eyes"]
    xu, yu, xsu = c.at("eyes")
    inv = c.inv
    iw = img[:, :, r0:r1, c0:c1]
    d_eye = ellipse(xsu, yu, P["eye_x"], P["eye_y"], P["eye_a"], P["eye_b"])
    in_eye = cov_(d_eye.clone(), inv)
    lid_y = P["eye_y"] - P["eye_b"] + 2.0 * P["eye_b"] * P["lid"]
    eye = in_eye * cov_(lid_y - yu, inv)
    xg = (xu - P["gaze_x"]).abs_().sub_(P["eye_x"])
    yg = yu - (P["eye_y"] + P["gaze_y"])
    r = (xg * xg).addcmul_(yg, yg).sqrt_()
    iris = cov_(r - P["iris_r"], inv)
    pupil = cov_(r - 0.45 * P["iris_r"], inv)
    hx, hy = xg.add_(0.35 * P["iris_r"]), yg.add_(0.35 * P["iris_r"])
    hl = cov_(hx.mul_(hx).addcmul_(hy, hy).sqrt_().sub_(0.18 * P["iris_r"]), inv)
    eye_rgb = torch.lerp(P["sclera"], P["iris"], iris.unsqueeze(1))
    eye_rgb.mul_(pupil.mul_(-0.85).add_(1.0).unsqueeze(1)).lerp_(P["glint"], hl.unsqueeze(1))
    iw.lerp_(eye_rgb, eye.unsqueeze(1))
    lash = band_(yu - lid_y, 1.2 * c.lw, inv).mul_(in_eye).mul_(0.75)
    iw.lerp_(P["lash"], lash.unsqueeze(1))


def _mouth(img: torch.Tensor, c: _Canvas, P: Tensors) -> None:
    """Lips as a lens around the mouth line, whose corners droop with age (and rise with a
    smile); lips thin with age."""
    r0, r1, c0, c1 = c.win["lower"]
    _, yl, xsl = c.at("lower")
    iw = img[:, :, r0:r1, c0:c1]
    mx = xsl * (1.0 / P["mouth_w"])
    dyl = yl - (P["mouth_y"] + P["mouth_curve"] * mx * mx)
    half = (1.0 - mx * mx).clamp_(min=0.0).sqrt_().mul_(P["lip_t"])
    half.mul_((dyl * 100.0).clamp_(-1.0, 1.0).mul_(0.3).add_(1.0))  # fuller lower lip
    lips = cov_(torch.maximum(dyl.abs() - half, xsl - P["mouth_w"]), c.inv)
    iw.lerp_(P["lip"], lips.unsqueeze(1))
    mline = band_(dyl, 0.8 * c.lw, c.inv).mul_(below(mx, 1.02, 0.1)).mul_(0.7)
    iw.lerp_(P["lip"] * 0.35, mline.unsqueeze(1))


# ------------------------------------------------------------- occluders, light, camera

_OCCLUDER_KEYS = (
    "occ",
    "occ_cx",
    "occ_cy",
    "occ_hw",
    "occ_hh",
    "occ_col",
    "eye_x",
    "eye_y",
    "eye_a",
    "eye_b",
    "nose_y",
    "chin",
    "jaw_a",
    "inv_px",
)


def _occluders(img: torch.Tensor, c: _Canvas, P: Tensors) -> None:
    """Sunglasses, a face mask or a random patch, drawn only on the images that have one."""
    sel = torch.nonzero(P["occ"].view(-1) > 0).view(-1)
    if not sel.numel():
        return
    o = {k: P[k][sel] for k in _OCCLUDER_KEYS}
    xo, yo, xso = c.x[sel], c.y[sel], c.xs[sel]
    # Sunglasses: two round lenses and a bridge.
    lens = ellipse(xso, yo, o["eye_x"], o["eye_y"], o["eye_a"] * 1.45, o["eye_b"] * 2.3)
    bridge_d = torch.maximum((yo - o["eye_y"] + 0.02).abs_().sub_(0.012), xso - o["eye_x"])
    d_glass = torch.minimum(lens, bridge_d)
    # Face mask: from below the nose bridge to below the chin, jaw-wide.
    d_mask = torch.maximum(
        torch.maximum(xso - o["jaw_a"] * 0.95, o["nose_y"] - 0.09 - yo),
        ellipse(xo, yo, 0.0, o["nose_y"] + 0.1, o["jaw_a"] * 1.05, o["chin"] - o["nose_y"] + 0.1),
    )
    # Random patch (a hand, a microphone, a caption box…).
    d_rect = torch.maximum(
        (xo - o["occ_cx"]).abs_().sub_(o["occ_hw"]), (yo - o["occ_cy"]).abs_().sub_(o["occ_hh"])
    )
    kind = o["occ"]
    d_occ = torch.where(kind == 1, d_glass, torch.where(kind == 2, d_mask, d_rect))
    sub = img[sel]
    sub.lerp_(o["occ_col"], cov_(d_occ, o["inv_px"]).unsqueeze(1))
    img[sel] = sub


def _lighting(img: torch.Tensor, fg: torch.Tensor, c: _Canvas, P: Tensors) -> None:
    """Lambert shading of an ellipsoid head plus ambient light, on the foreground ``fg``
    (skin and hair). The light's intensity and the 0–255 range are in light_gain/base, its
    colour is already in every colour. The background gets the flat (frontal) term.
    Consumes the canvas's full-frame x and y (modified in place)."""
    nx = c.x.mul_(P["inv_nx"])
    ny = c.y.mul_(1.0 / 0.95)
    nz = (nx * nx).addcmul_(ny, ny).neg_().add_(1.0).clamp_(min=0.0).sqrt_()
    lam = nx.mul_(P["light_x"]).addcmul_(ny, P["light_y"]).addcmul_(nz, P["light_z"])
    light = torch.lerp(P["flat"], lam.clamp_(min=0.0), fg)
    light.mul_(P["light_gain"]).add_(P["light_base"])
    img.mul_(light.unsqueeze(1))


def _camera(img: torch.Tensor, P: Tensors, tex: Tensors, gen: torch.Generator) -> torch.Tensor:
    """Defocus blur on some images, then sensor noise, then 8-bit quantization."""
    bsel = torch.nonzero(P["blur"].view(-1) > 0).view(-1)
    if bsel.numel():
        sub = img[bsel]
        padded = F.pad(sub, (1, 1, 1, 1), mode="replicate")
        bl = (padded[..., :-2, :] + padded[..., 1:-1, :]).add_(padded[..., 2:, :])
        bl = (bl[..., :-2] + bl[..., 1:-1]).add_(bl[..., 2:]).mul_(1.0 / 9.0)
        sub.lerp_(bl, P["blur"][bsel].unsqueeze(1))
        img[bsel] = sub
    # Sensor noise: fresh luminance noise, plus weaker chroma noise picked from a bank.
    size = img.shape[-1]
    sigma = P["noise"].unsqueeze(1)
    img.addcmul_(torch.randn((img.shape[0], 1, size, size), generator=gen), sigma)
    img.addcmul_(tex["chroma"][P["i_chroma"]], sigma * 0.5)
    return img.clamp_(0.0, 255.0).to(torch.uint8)  # truncation: 8-bit quantization
