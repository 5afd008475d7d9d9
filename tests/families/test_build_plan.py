"""TensorRT build plans (no TensorRT needed) for each family's package: every graph's ops importable,
the context cap honoured, and for LLaVA-NeXT the vision profile sized in tiles and the prompt in the
largest anyres token count."""

from __future__ import annotations

import pytest

from llava_edge import anyres_grid as anyres

from .conftest import FAMILIES


@pytest.mark.parametrize("preset", [*FAMILIES, "next-mistral"])
def test_plan_per_family(family_models, preset):
    from llava_edge.trt.plan import plan_build
    from llava_edge.package import load_manifest

    pkg = family_models[preset]["package"]
    m = load_manifest(pkg)
    plan = plan_build(pkg, "10.3", "orin-agx")
    assert all(c.ok for c in plan.checks.values()), plan.describe()
    assert plan.limits.max_context <= m.text.max_context  # Mistral's window / Phi-3's longrope cap
    (vision,) = plan.profiles["vision"]
    max_batch = vision.shapes["pixel_values"][2][0]
    assert max_batch == plan.limits.max_batch * plan.limits.max_images * anyres.max_tiles(m.vision)
    tokens = anyres.max_image_tokens(m.vision)
    assert plan.limits.max_prompt >= min(plan.limits.max_context - 1, plan.limits.max_images * tokens)
    if m.vision.anyres:
        assert anyres.max_tiles(m.vision) == 1 + 4 and tokens == 16 + 8 * (8 + 1)  # the 64x64 grid, 2x2 tiles
