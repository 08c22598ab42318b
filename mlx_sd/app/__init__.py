"""The command-line application: the `mlx-sd` commands, settings, the OS service, Bonjour."""
