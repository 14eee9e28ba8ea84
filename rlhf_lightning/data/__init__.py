"""Reading, preprocessing and validating preference and prompt data, and the built-in task that
samples and labels its own: the first stages of the flow (sample_builtin_task, preprocess, validate)."""
