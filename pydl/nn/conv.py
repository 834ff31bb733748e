"""Drop-in convolution module backed by pydl.ops.

``Conv2d`` subclasses ``torch.nn.Conv2d``: same constructor arguments, parameters, state_dict keys
and ``extra_repr``, so it loads a torch (or timm) checkpoint unchanged and replaces
``nn.Conv2d`` anywhere.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.conv2d import conv2d


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` computed by ``pydl.ops.conv2d`` (depthwise layers by
    ``pydl.ops.depthwise_conv2d``, which conv2d routes them to).

    ``padding_mode`` other than "zeros" ("reflect", "replicate", "circular") pads the input with
    torch's ``F.pad`` first, exactly as ``nn.Conv2d`` does, then runs the pydl kernel with no
    padding. ``backend`` (an attribute, not a constructor argument or state) forces a pydl
    backend for this module's calls: "triton" or "torch"; None lets pydl choose.
    """

    backend: Optional[str] = None

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.padding_mode != "zeros":
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups, backend=self.backend)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                      backend=self.backend)
