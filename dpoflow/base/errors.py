"""The one base class of errors whose message says all a user needs to act on them."""


class Explained(Exception):
    """Bad input, a missing tool, a check that failed: the message names what and where. On the
    terminal such an error is its message alone; its traceback goes to the run's log in Prefect."""
