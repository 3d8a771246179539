"""microGPT: a GPT written from its equations in JAX (see microgpt/model.py)."""
from microgpt.model import (MicroGPT, count_params, forward, init_params, loss_fn, micro_gpt_1,
                            micro_gpt_2, micro_gpt_4)

__all__ = ["MicroGPT", "micro_gpt_1", "micro_gpt_2", "micro_gpt_4", "init_params", "forward",
           "loss_fn", "count_params"]
