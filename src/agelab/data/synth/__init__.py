"""Procedural synthetic faces: the default data set, drawn by agelab itself.

No face data set can be downloaded in the default setting, so agelab draws cartoon faces
whose age can be read the way it is read from real photographs: from many weak cues at
several scales, each a smooth function of age with person-to-person variation, under
nuisance factors that have nothing to do with age.

Age cues (each a smooth function of age, plus per-subject offsets)
    * head and face proportions — a child's cranium is large against the face, the eyes sit
      low in the head and are large and round, nose/mouth/chin are small, cheeks are full
      and rosy; the face lengthens towards adult proportions through the teens
      (``maturity``, with a per-subject timing offset);
    * hair — sparse, thin hair on babies; greying as a salt-and-pepper strand mask whose
      grey fraction is a logistic in age with a per-subject onset, speed and final level
      (and some subjects dye their hair); eyebrows grey later; a receding hairline
      (temples first, then the crown) for subjects with a balding propensity;
    * skin — forehead lines that grow in number and contrast, crow's feet, nasolabial
      folds, marionette lines, under-eye bags, neck lines, age spots and blotchy skin,
      thinner lips, drooping eyelids and mouth corners, a sagging jaw line, slightly
      longer nose and larger ears; all driven by a per-subject "skin age";
    * beard stubble on some adult male subjects (absent before puberty).

Nuisance factors (independent of age)
    skin tone, hair colour and style (length, fringe, volume), iris colour, face shape,
    clothing colour, expression (smile), gaze, pose (rotation, shift, scale), lighting
    (direction, intensity, colour temperature, 3-D shading of the head), background
    (colour, gradient, blotchy texture), defocus blur, sensor noise, and — with
    probability ``occluder_prob`` — an occluder: sunglasses, a face mask or a random patch.

Subjects
    Image ``i`` belongs to subject ``i // images_per_subject``; a subject's fixed traits
    (skin tone, hair colour, face shape, greying onset, balding and skin-ageing rates, …)
    are shared by all its images, which are drawn at independent ages from the age
    distribution (so the marginal age distribution is exact), as in FG-NET/MORPH where one
    person appears at several ages. Subject-disjoint splits therefore matter.

Drawing is vectorized: chunks of :func:`chunk_size` images (about 2¹⁸ pixels) are rendered
at once in torch as implicit shapes on a coordinate grid (ellipses and boxes as approximate
signed distance fields, lines as distance-to-curve bands, anti-aliased by a one-pixel
linear ramp); local features (eyes, mouth, wrinkles…) are only evaluated in the pixel
window that holds them. Chunks run on a small thread pool, torch single-threaded in each.
All per-image parameters come from a numpy ``Generator`` seeded by ``cfg.seed``; pixel
noise comes from a ``torch.Generator`` seeded per chunk, so the same config gives
byte-identical images, whatever the number of threads. Separate random streams are used
for ages, subject traits, per-image nuisances and label noise, so changing the label
noise does not change a single pixel.

Modules, in the order a face is made:

:mod:`.ages`      true ages from the age distribution, noisy labels
:mod:`.traits`    per-subject traits (identity and personal ageing rates)
:mod:`.params`    per-image parameters: age cues, nuisances, size-dependent values, windows
:mod:`.shapes`    drawing primitives (coverage of ellipses, bands) and texture banks
:mod:`.render`    one chunk, layer by layer (background … lighting, camera)
:mod:`.generate`  :func:`generate`: streams, chunks, thread pool → :class:`SynthFaces`
:mod:`.sheet`     :func:`contact_sheet` (``agelab data preview`` writes one)

The generator's speed is measured by ``agelab bench``.
"""

from agelab.data.synth.ages import add_label_noise, sample_ages
from agelab.data.synth.generate import SynthFaces, chunk_size, generate
from agelab.data.synth.sheet import contact_sheet

# Bump when a change alters the generated images or labels: it is part of the cache key.
VERSION = "1"

__all__ = [
    "VERSION",
    "SynthFaces",
    "add_label_noise",
    "chunk_size",
    "contact_sheet",
    "generate",
    "sample_ages",
]
