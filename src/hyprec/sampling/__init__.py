"""Token selection for text generation: penalties, greedy or filtered temperature sampling, and logprobs.

The sampler lives in ``hyprec.sampling.sampler``; the per-request options in ``hyprec.sampling_params``.
"""
