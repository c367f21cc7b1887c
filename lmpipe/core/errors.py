"""Errors that mean "the user's input is wrong" (exit code 2, never retried by the flow)."""


class InputError(Exception):
    """Bad params, a bad file or a bad argument. The message names the thing at fault."""


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
