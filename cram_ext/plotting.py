"""matplotlib for the functions that draw figures: the `plot` extra, imported only when a
figure is drawn so that the rest of the package never needs it."""


def pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend, or an ImportError saying what to
    install."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError('drawing figures needs matplotlib: pip install "cram_ext[plot]"'
                          ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
