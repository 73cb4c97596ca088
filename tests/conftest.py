from __future__ import annotations

import torch

# The suite must stay fast on 2 CPU cores: one intra-op thread avoids oversubscription.
torch.set_num_threads(1)
