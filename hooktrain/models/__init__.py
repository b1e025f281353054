"""Models, used by the engine only as shapes for ``torch.func.functional_call``.

A recipe names its model by a factory (``Ref("resnet9", width=64)``); the run passes the facts
a factory declares (``num_classes``, ``num_outputs``, ``in_channels``, ``input_shape``).
"""

from hooktrain.models.layers import Dropout, hashed_uniform, shard_randomness
from hooktrain.models.resnet9 import resnet9

__all__ = ["Dropout", "hashed_uniform", "resnet9", "shard_randomness"]
