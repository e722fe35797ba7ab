"""The gated delta rule (Gated DeltaNet's recurrence), in three forms with one contract.

For each value head, with its key head's ``q_t``, ``k_t`` (key heads are shared by consecutive groups of value
heads), value ``v_t``, log-decay ``g_t <= 0`` and write strength ``beta_t``, over a state ``S`` [d_k, d_v]:

    S~_t = exp(g_t) S_{t-1};   S_t = S~_t + k_t (beta_t (v_t - S~_t^T k_t))^T;   o_t = S_t^T (scale q_t)

- :func:`chunk_gated_delta_rule` (``chunk.py``): training and prompts, 64 tokens at a time (the WY/UT form) with
  a hand-written backward;
- :func:`gated_delta_step` (``step.py``): one token, for generation;
- :func:`naive_gated_delta_rule` (``naive.py``): the plain recurrence token by token, the tests' oracle.

Inputs are ``[B, T, heads, dim]`` (``g``, ``beta`` ``[B, T, Hv]``); with ``cu_seqlens`` [S + 1] (offsets of S
sequences laid end to end in one row, B = 1) each sequence starts from its own state, so packed rows never
share one. The state is fp32 (fp64 for fp64 inputs) whatever the inputs' dtype.
"""

from nibble.nn.delta_rule.chunk import CHUNK, chunk_gated_delta_rule
from nibble.nn.delta_rule.naive import naive_gated_delta_rule
from nibble.nn.delta_rule.step import gated_delta_step

__all__ = ["CHUNK", "chunk_gated_delta_rule", "gated_delta_step", "naive_gated_delta_rule"]
