"""The toolkit's own error types: each message names the file or config key and what to do."""


class FinetuneError(Exception):
    """Base of the errors the CLI prints as one line, without a traceback."""


class ConfigError(FinetuneError):
    """A config key is missing, unknown, of the wrong type, or contradicts another."""


class DatasetError(FinetuneError):
    """The dataset cannot be used (no images, unreadable folder); names the path."""


class ModelError(FinetuneError):
    """A model path is not an SDXL model we can load; names the path."""


class CheckpointError(FinetuneError):
    """A checkpoint cannot be resumed or written; names the folder."""
