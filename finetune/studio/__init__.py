"""The studio: a local web UI over the same library, config files and run folders as the CLI.

Only `finetune studio` imports this package (Gradio is the optional `studio` extra); the trainer
and every other module of the toolkit work without it.
"""
