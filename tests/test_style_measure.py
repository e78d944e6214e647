"""The style measure on the procedural world's own renders, where every image's style is known."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.continual import evaluation_captions, reference_renders
from share_diffusion import world
from share_diffusion.style_measure import StyleMeasure, StyleSpace

STYLES = ("sepia", "duotone", "halftone")  # sepia and duotone both replace colour by a tint


@pytest.fixture(scope="module")
def renders():
    captions = evaluation_captions(24, seed=7)
    base = np.stack([world.render(world.parse_caption(c)) for c in captions]).astype(np.float32) / 255
    references = {s: reference_renders(s, captions).astype(np.float32) / 255 for s in STYLES}
    rerendered = {s: reference_renders(s, captions, jitter_seed=900).astype(np.float32) / 255 for s in STYLES}
    return base, references, rerendered


def test_specific_strength_tells_apart_styles_that_strength_confuses(renders):
    base, references, rerendered = renders
    space = StyleSpace(base, references)
    # S of duotone's images against sepia's references is far from 0: both move toward a tint
    assert StyleMeasure(base, references["sepia"]).strength(rerendered["duotone"]).value > 0.3
    for made in STYLES:
        specific = space.specific_strength(rerendered[made])
        assert specific[made].value == pytest.approx(1, abs=0.1), (made, specific)
        assert all(abs(specific[other].value) < 0.1 for other in STYLES if other != made), (made, specific)


def test_specific_strength_is_zero_for_the_base_and_grows_with_a_blend(renders):
    base, references, _ = renders
    space = StyleSpace(base, references)
    assert all(abs(e.value) < 1e-6 for e in space.specific_strength(base).values())
    blends = [space.specific_strength((1 - a) * base + a * references["sepia"])["sepia"].value for a in (0.25, 0.5, 0.75)]
    assert 0 < blends[0] < blends[1] < blends[2] < 1, blends
    fractions = space.unique_fraction()
    assert all(0 < f < 1 for f in fractions.values()) and fractions["halftone"] > fractions["sepia"], fractions
