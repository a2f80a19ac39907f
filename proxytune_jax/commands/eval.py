"""`proxytune eval` (not built yet: see the open issue for it)."""


def add_arguments(parser):
    pass


def run(args) -> int:
    print("proxytune eval: not built yet.")
    return 0
