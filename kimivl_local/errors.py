"""Errors a user can act on. Each message names the file, tensor, argument or limit at fault."""


class KimiVLError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ModelNotFoundError(KimiVLError):
    """--model names neither a folder nor a repo id present in the local Hugging Face cache."""


class ConfigError(KimiVLError):
    """A checkpoint JSON file is missing, unreadable, or describes an unsupported model."""


class CheckpointError(KimiVLError):
    """Weights are missing, unexpected, truncated, or of the wrong shape or dtype."""


class TokenizerError(KimiVLError):
    """The tokenizer files are missing or inconsistent with the model config."""


class ContextLengthError(KimiVLError):
    """A prompt (plus the tokens to generate) does not fit the model's context."""


class InputError(KimiVLError):
    """A message, image or option given by the user cannot be used."""


class NonFiniteLogitsError(KimiVLError):
    """The model produced NaN or infinite logits, so no token can be chosen."""
