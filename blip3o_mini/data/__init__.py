"""ShapesWorld (the toy world) and WebDataset shards (the format of BLIP3-o's real data)."""

from .dataset import generate, generate_split, make_sample, scene_at, scene_of, summarize
from .text import QUESTION_TYPES, captions, parse_caption, questions
from .world import (COLORS, HELD_OUT, IMAGE_SIZE, PALETTE, RELATION_RULES, SHAPES, Obj, Scene, relation,
                    render, sample_scene, swap_places)
