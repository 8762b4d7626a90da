"""The denoising loop: sampler policies, the step, events and results."""
