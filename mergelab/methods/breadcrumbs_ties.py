"""Model Breadcrumbs with TIES sign election and disjoint sum.

Source: arXiv:2312.06795, with TIES (arXiv:2306.01708).
Math: the generalized task-arithmetic steps in `_task_arithmetic.py` with sparsification
`magnitude_outliers`, sign consensus True; defaults normalize=False, rescale=False (as mergekit).
"""

from mergelab.methods._task_arithmetic import TaskArithmeticFamily, preset_params


class BreadcrumbsTies(TaskArithmeticFamily):
    name = "breadcrumbs_ties"
    sparsify = "magnitude_outliers"
    consensus = True
    randomised = False
    params = preset_params(sparsify="magnitude_outliers", consensus=True, normalize=False, rescale=False)
