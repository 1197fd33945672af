"""The exception types raised at dsvl2's public boundary.

Every error a user can cause (a bad conversation, an unreadable image, a config that
cannot describe a model, a checkpoint with missing tensors) is one of these, with a
message that names the bad value and says what is allowed. They subclass ValueError /
FileNotFoundError so that callers who only know the standard types still catch them.
"""


class DSVL2Error(Exception):
    """Base class of every error dsvl2 raises on purpose."""


class ConfigError(DSVL2Error, ValueError):
    """A config.json / processor_config.json value is missing, of the wrong type or impossible."""


class CheckpointError(DSVL2Error, ValueError):
    """A checkpoint folder or weight file is missing, incomplete or does not match the config."""


class ConversationError(DSVL2Error, ValueError):
    """A conversation (roles, contents, image tags, images) cannot be turned into a prompt."""


class ImageError(DSVL2Error, ValueError):
    """An image cannot be read or decoded."""


class ImageTooLargeError(ImageError):
    """An image, or a conversation's images together, hold more pixels than allowed.

    Raised from the declared size, before decoding where the format allows it (a
    decompression bomb costs nothing); a server answers it with 413, other ImageErrors
    with 400."""


class GenerationError(DSVL2Error, ValueError):
    """Generation options are invalid or a request does not fit the model (e.g. the context window)."""


class ContextLengthError(GenerationError):
    """A conversation's prompt does not leave ``room`` answer tokens of the context window,
    even with every older exchange dropped (``history.fit_history``): ``tokens`` is what the
    messages that cannot be dropped need."""

    def __init__(self, tokens: int, window: int, room: int):
        self.tokens, self.window, self.room = tokens, window, room
        super().__init__(f"the prompt needs {tokens} tokens (images included) and {room} more to answer, but the "
                         f"model's context window is {window} tokens")

    def __reduce__(self):  # pickled with its fields (e.g. across Ray's process boundary)
        return type(self), (self.tokens, self.window, self.room)
