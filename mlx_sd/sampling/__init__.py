"""SD-1 sampling in k-diffusion form: `schedules` (sigmas and timesteps), `denoisers` (UNet -> x0,
guidance), `samplers` / `samplers_multistep` (step generators), `registry` (the A1111 sampler names)
and `catalog` (what each name runs). Seeded noise comes from `mlx_sd.engine.random`."""
