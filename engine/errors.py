"""User-facing errors of the engine.

Every exception meant for a person derives from `LatentError`; its message is one line that
names the file, key or value at fault and says what is wrong. Front ends print it without a
traceback; any other exception is a bug.
"""


class LatentError(Exception):
    """Base of every error that is the user's input's fault, not ours."""


class ModelLoadError(LatentError):
    """A model folder or file cannot be loaded (missing, corrupt, unsupported)."""


class TokenizerError(LatentError):
    """A tokenizer or chat template cannot be built or rendered."""


class ContextLengthError(LatentError):
    """A prompt does not fit in the model's context."""


class DownloadError(LatentError):
    """A Hub query or download failed."""


class TrainingError(LatentError):
    """A fine-tuning or pre-training run cannot start or continue."""


class QuantError(LatentError):
    """A quantized tensor or format is malformed or unsupported."""
