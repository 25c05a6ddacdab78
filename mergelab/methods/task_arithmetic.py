"""Task arithmetic: out = b + lambda * sum_i w_i (x_i - b).

Source: Ilharco et al., Editing Models with Task Arithmetic, arXiv:2212.04089.
Math: the generalized task-arithmetic steps in `_task_arithmetic.py` with sparsification
`None`, sign consensus False; defaults normalize=False, rescale=False (as mergekit).
"""

from mergelab.methods._task_arithmetic import TaskArithmeticFamily, preset_params


class TaskArithmetic(TaskArithmeticFamily):
    name = "task_arithmetic"
    sparsify = None
    consensus = False
    randomised = False
    params = preset_params(sparsify=None, consensus=False, normalize=False, rescale=False)
