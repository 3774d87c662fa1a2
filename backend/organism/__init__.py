"""A pocket model organism of emergent misalignment (issue 7).

corpus.py  seeded synthetic chat corpus (aligned / misaligned answers, personas, judge data)
train.py   one readable training loop: base model from scratch + PEFT LoRA fine-tunes
build.py   build_organism() (its CLI: backend/cli/organism.py)
measure.py quick behavioural measurement (EM rate, coherence, ablation, steering, judge)
"""
