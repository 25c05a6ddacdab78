"""Evolutionary merge search (`mergelab search`), built on the search layer `mergelab.blackbox`.

    schema.py         the job file as users write it (pydantic)
    job.py            load_job: the file resolved once into a `Job` (template, space, fitness, settings)
    dimensions.py     search entries -> the searched quantities (bounds, starts)
    space.py          genome <-> nevergrad parametrization <-> recipe
    fitness_spec.py   fitness and splits checked and resolved -> fitness.py (terms, goal, normalisation, loss)
    live.py           the live model a worker merges each candidate into
    scoring.py        a model scored on the fitness terms of one split
    evaluator.py      what each worker holds (`SearchEvaluator`)
    loop.py           the driver: ask/tell, trials.jsonl, select, report.json
    report.py         `mergelab search report`: fitness.png, report.md
"""
