"""TIES: trim each task vector to its top-density magnitudes, elect a sign per entry, average the agreeing entries.

Source: Yadav et al., TIES-Merging, arXiv:2306.01708.
Math: the generalized task-arithmetic steps in `_task_arithmetic.py` with sparsification
`magnitude`, sign consensus True; defaults normalize=True, rescale=False (as mergekit).
"""

from mergelab.methods._task_arithmetic import TaskArithmeticFamily, preset_params


class Ties(TaskArithmeticFamily):
    name = "ties"
    sparsify = "magnitude"
    consensus = True
    randomised = False
    params = preset_params(sparsify="magnitude", consensus=True, normalize=True, rescale=False)
