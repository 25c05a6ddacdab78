"""DARE-TIES: DARE's random drop and rescale, then TIES's sign election and disjoint sum.

Source: Yu et al., arXiv:2311.03099, with TIES (arXiv:2306.01708).
Math: the generalized task-arithmetic steps in `_task_arithmetic.py` with sparsification
`random`, sign consensus True; defaults normalize=False, rescale=True (as mergekit).
"""

from mergelab.methods._task_arithmetic import TaskArithmeticFamily, preset_params


class DareTies(TaskArithmeticFamily):
    name = "dare_ties"
    sparsify = "random"
    consensus = True
    randomised = True
    params = preset_params(sparsify="random", consensus=True, normalize=False, rescale=True)
