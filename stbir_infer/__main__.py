"""``python -m stbir_infer`` is the ``stbir-infer`` command."""

from stbir_infer.cli import main

if __name__ == "__main__":
    main(prog_name="stbir-infer")
