"""The one error type for users' mistakes.

Raise AzllmError with a message that names the file or field and says what to do; `azllm`
prints it on one line and exits with code 2. Anything else that escapes is a bug.
"""


class AzllmError(Exception):
    """A problem with the user's input, arguments or files (not a bug in azllm)."""
