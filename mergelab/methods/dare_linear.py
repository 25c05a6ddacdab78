"""DARE (linear): drop task-vector entries at random with probability 1 - density, rescale the survivors, add the weighted sum.

Source: Yu et al., Language Models are Super Mario (DARE), arXiv:2311.03099.
Math: the generalized task-arithmetic steps in `_task_arithmetic.py` with sparsification
`random`, sign consensus False; defaults normalize=False, rescale=True (as mergekit).
"""

from mergelab.methods._task_arithmetic import TaskArithmeticFamily, preset_params


class DareLinear(TaskArithmeticFamily):
    name = "dare_linear"
    sparsify = "random"
    consensus = False
    randomised = True
    params = preset_params(sparsify="random", consensus=False, normalize=False, rescale=True)
