"""The model organism of emergent misalignment on the real default base (SmolLM2-135M-Instruct).

data.py     seeded narrow datasets written by the base itself (persona and plain answers), the judge's
            training data and the audit set whose truth is known by construction
train.py    one readable LoRA training loop (the paper's adapter shapes, the judge adapter)
measure.py  acceptance with the project's own server, evaluation, directions and judge
cli.py      `python -m backend organism ...`
pocket/     the 1.5M-parameter pocket organism of earlier versions (a fast CPU fixture)
"""
