"""The tiny model zoo: synthetic skills, a pretrained base, experts and LoRA adapters.

`build_zoo(dir)` trains it on CPU in minutes, deterministically; `open_zoo(dir)` finds its members.
"""

from __future__ import annotations

from mergelab.zoo.build import ADAPTERS, EXPERTS, HELD_OUT, build_zoo
from mergelab.zoo.layout import Zoo, open_zoo
from mergelab.zoo.skills import SKILLS

__all__ = ["ADAPTERS", "EXPERTS", "HELD_OUT", "SKILLS", "Zoo", "build_zoo", "open_zoo"]
