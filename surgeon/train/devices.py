"""Which device training runs on, and the precision it runs in.

``auto`` is the GPU when one is visible (under ``torchrun``, the one of this process's ``LOCAL_RANK``), else the CPU.
Asking for a GPU that is not there is a one-line error, never a silent fall-back to the CPU.
"""

from __future__ import annotations

import os
import re

import torch

from surgeon.errors import SurgeonError

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → a device that exists."""
    spec = spec.strip().lower()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec):
        raise SurgeonError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SurgeonError(f"--device {spec}: no CUDA device is available (torch.cuda.is_available() is False; "
                           "use --device cpu)")
    index = int(spec.split(":")[1]) if ":" in spec else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise SurgeonError(f"--device {spec}: cuda:{index} does not exist ({torch.cuda.device_count()} CUDA "
                           "device(s) visible)")
    return torch.device("cuda", index)


def amp_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` (None: full precision)."""
    if name not in AMP_DTYPES:
        raise SurgeonError(f"--amp {name!r}: expected one of {', '.join(AMP_DTYPES)}")
    return AMP_DTYPES[name]
