"""DELLA without sign election: MAGPRUNE, rescale, weighted sum.

Source: Deep et al., DELLA-Merging, arXiv:2406.11617.
Math: the generalized task-arithmetic steps in `_task_arithmetic.py` with sparsification
`della_magprune`, sign consensus False; defaults normalize=False, rescale=True (as mergekit).
"""

from mergelab.methods._task_arithmetic import TaskArithmeticFamily, preset_params


class DellaLinear(TaskArithmeticFamily):
    name = "della_linear"
    sparsify = "della_magprune"
    consensus = False
    randomised = True
    params = preset_params(sparsify="della_magprune", consensus=False, normalize=False, rescale=True)
