"""One module per stage; each has ``main(argv=None) -> int``."""

STAGES = {
    "prefix-tune": "dali.stages.prefix_tune",
    "align": "dali.stages.align",
    "pseudo-label": "dali.stages.pseudo_label",
    "distill": "dali.stages.distill",
    "infer": "dali.stages.infer",
    "evaluate": "dali.stages.evaluate",
}
