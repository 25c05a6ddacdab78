"""Black-box search, below both searches of mergelab (`evolve/`: merge recipes; `lora/hub*`:
LoraHub weights): a candidate is only ever evaluated, never differentiated.

    spec.py        job-file reading, workers' settings, split ranges (the strict base: mergelab.user_yaml)
    optimizer.py   a nevergrad optimizer from a registry name + options, seeded, with start points
    pool.py        WorkerPool (in process, or Ray actors: ray_pool.py) and its typed messages
    loop.py        ask/tell over the pool; the worst-loss rule

This package imports neither user; both import it.
"""
