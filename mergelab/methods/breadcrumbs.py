"""Model Breadcrumbs: drop the largest (outlier, gamma) and the smallest entries of each task vector, keep density of them.

Source: Davari and Belilovsky, Model Breadcrumbs, arXiv:2312.06795.
Math: the generalized task-arithmetic steps in `_task_arithmetic.py` with sparsification
`magnitude_outliers`, sign consensus False; defaults normalize=False, rescale=False (as mergekit).
"""

from mergelab.methods._task_arithmetic import TaskArithmeticFamily, preset_params


class Breadcrumbs(TaskArithmeticFamily):
    name = "breadcrumbs"
    sparsify = "magnitude_outliers"
    consensus = False
    randomised = False
    params = preset_params(sparsify="magnitude_outliers", consensus=False, normalize=False, rescale=False)
