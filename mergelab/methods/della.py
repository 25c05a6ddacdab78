"""DELLA: drop entries with probabilities that fall with their magnitude rank in the row (MAGPRUNE), rescale, TIES sign election.

Source: Deep et al., DELLA-Merging, arXiv:2406.11617.
Math: the generalized task-arithmetic steps in `_task_arithmetic.py` with sparsification
`della_magprune`, sign consensus True; defaults normalize=True, rescale=True (as mergekit).
"""

from mergelab.methods._task_arithmetic import TaskArithmeticFamily, preset_params


class Della(TaskArithmeticFamily):
    name = "della"
    sparsify = "della_magprune"
    consensus = True
    randomised = True
    params = preset_params(sparsify="della_magprune", consensus=True, normalize=True, rescale=True)
