"""Does a shapes model follow the direction word of a position prompt? (docs/results/speedups.md, session 10)

For each of N position prompts "A <rel> B" it draws, from the same noise, the prompt itself and the prompt with the
opposite relation ("A <opposite> B"). A model that reads the direction draws both correctly; one that only places
the two objects on the named axis and leaves the side to the noise gets exactly one of the pair right. Reported:
the GenEval position accuracy of both prompt sets, the failure modes (an object missing, or both present on the wrong
side) and `follows_direction`: the share of pairs with both right among the pairs with at least one right (about 0
for a model blind to the word, 1 for a perfect one).

    python scripts/relation_probe.py rectflow/assets/default_model [--prompts 40] [--out probe.json]

The prompts come from shapes.eval_prompts with seed 7, not the seed of `rectflow eval`, and the evaluator is
rectflow's (Euler 50 steps, CFG 5, the EMA weights of a run).
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import sys

from rectflow.checkpoints import source_weights
from rectflow.data.shapes import caption_for, eval_prompts, relation_of
from rectflow.evaluate.geneval import ShapesDetector, is_correct, matches
from rectflow.evaluate.protocol import Setting, generate_images
from rectflow.pipeline import load_pipeline

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def failure(meta: dict, detections) -> str:
    """'ok', 'missing' (a named object is not drawn) or 'wrong side' (both drawn, the relation flipped or off-axis)."""
    if is_correct(meta, detections):
        return "ok"
    found = [matches(detections, o["shape"], o["color"]) for o in meta["objects"][:2]]
    if not all(found):
        return "missing"
    got = relation_of(found[0][0].center, found[1][0].center)
    return "wrong side" if got == OPPOSITE[meta["relation"]] else "wrong axis"


def probe(source: str, prompts: int, seed: int = 1000) -> dict:
    """The probe's report for a weights file, checkpoint folder or run directory."""
    pipe = load_pipeline(None, str(source_weights(source, None)), None, "cpu")
    metas = eval_prompts(prompts, seed=7, categories=("position",))
    flipped = [dict(copy.deepcopy(m), relation=OPPOSITE[m["relation"]]) for m in metas]
    detector, modes, right = ShapesDetector(), {}, {}
    for name, group in (("prompt", metas), ("opposite", flipped)):
        images = generate_images(pipe, [caption_for(m) for m in group], Setting("ema", 50, 5.0), seed=seed)
        found = [failure(m, detector(im)) for m, im in zip(group, images)]
        modes[name] = dict(collections.Counter(found))
        right[name] = [f == "ok" for f in found]
    pairs = collections.Counter(zip(right["prompt"], right["opposite"]))
    some = pairs[(True, True)] + pairs[(True, False)] + pairs[(False, True)]
    return {"source": source, "prompts": prompts, "accuracy": {k: sum(v) / prompts for k, v in right.items()},
            "failures": modes, "both_right": pairs[(True, True)], "one_right": some - pairs[(True, True)],
            "follows_direction": pairs[(True, True)] / some if some else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", help="a run directory, checkpoint folder or weights file of a shapes model")
    parser.add_argument("--prompts", type=int, default=40, help="position prompts (each drawn twice)")
    parser.add_argument("--out", help="write the JSON report here (else stdout only)")
    args = parser.parse_args(argv)
    report = probe(args.model, args.prompts)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
