"""Model dtypes by the name a config or a flag gives them (training's --dtype, the server's --dtype)."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
