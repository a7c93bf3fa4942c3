"""Redis session state: the only code that reads or writes Redis keys."""
