"""microGPT: a GPT written from its equations in JAX (microgpt/model.py), built by microgpt/gpt.py."""
from microgpt.gpt import MicroGPT, gpt2_small, micro_gpt_1, micro_gpt_2, micro_gpt_4
from microgpt.model import count_params, forward, init_params, loss_fn

__all__ = ["MicroGPT", "micro_gpt_1", "micro_gpt_2", "micro_gpt_4", "gpt2_small", "init_params",
           "forward", "loss_fn", "count_params"]
