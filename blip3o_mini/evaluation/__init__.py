"""GenEval-mini: GenEval's six tasks and scoring rule (Ghosh et al. 2023, the benchmark
BLIP3-o reports) on ShapesWorld, with a rule-based detector calibrated on exact ground truth.

prompts.py    prompt metadata in GenEval's format; prompts from a scene graph
detector.py   palette colours, connected components, shape classification
folder.py     GenEval's image folder layout (write a generator's images, read them back)
reference.py  ground-truth renders of a prompt (the "perfect generator")
score.py      GenEval's per-image rule, per-tag and overall accuracy, seen / unseen
calibrate.py  reference ~1.0, shuffled ~chance, blurred / noisy still high
misses.py     why an image missed (the first broken constraint), what was drawn for a colour
caption_agreement.py  how often a training caption's relation is one GenEval's rule holds
"""

from .caption_agreement import agreement, caption_relations, position_ceiling
from .calibrate import Calibration, add_noise, calibrate, exact_fraction, gaussian_blur, same_objects
from .detector import Detection, DetectorConfig, detect
from .folder import read_geneval_folder, write_geneval_folder
from .misses import MISS_KINDS, drawn_relation, drawn_shape, miss_kind, relation_verdict
from .prompts import (TAGS, make_prompts, prompt_from_scene, read_prompts, relative_position,
                      validate_metadata, write_prompts)
from .reference import reference_images, reference_scene
from .score import GenEvalResult, evaluate, score_folder, score_images
