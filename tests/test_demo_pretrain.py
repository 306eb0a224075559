"""The image encoder's pretraining heads: what they are asked, and that they can learn it."""

from __future__ import annotations

import numpy as np
import torch

from blip2.demo import evaluate, world
from blip2.demo.pretrain import LabelledImages, VisionPretraining, scene_labels
from blip2.demo.recipe import Recipe, vision_config
from blip2.modeling.vision import VisionEncoder


def test_object_ids_are_ranks_from_the_left():
    """patch_object k + 1 is the k-th shape from the left: the rank head's label."""
    for index in range(40):
        scene = world.sample_scene("train", index)
        labels = scene_labels(scene, 64, 16)
        xs = [labels["patch_where"][labels["patch_object"] == k + 1][:, 0] for k in range(len(scene.shapes))]
        centres = [float(x[0]) for x in xs if len(x)]
        assert centres == sorted(centres)


def test_every_head_learns_a_few_scenes():
    torch.manual_seed(0)
    r = Recipe(vision_hidden=32, vision_layers=1)
    scenes = [s for s in (world.sample_scene("train", i) for i in range(30)) if len(s.shapes) == 3][:4]
    images = np.stack([evaluate.resized(world.render(s), r.image_size) for s in scenes])
    data = LabelledImages(images, [scene_labels(s, r.image_size, r.patch_size) for s in scenes])
    objective = VisionPretraining(VisionEncoder(vision_config(r)))
    optimizer = torch.optim.Adam(objective.parameters(), lr=3e-3)
    batch = data.collate(list(range(len(scenes))))
    first = {k: v.item() for k, v in objective(batch, 0).items()}
    assert set(first) == {"colour", "shape", "where", "rank", "loss"}
    for step in range(150):
        loss = objective(batch, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = {k: v.item() for k, v in objective(batch, 150).items()}
    for name in ("colour", "shape", "where", "rank"):
        assert last[name] < 0.5 * first[name], (name, first[name], last[name])
