"""Where the test data lives: everything the suite reads is inside the repository.

``tests/data/golden`` is the oracle (reference outputs for small checkpoints in the real
formats), ``tests/data/images`` the public test images it was made from, and
``tests/data/configs`` the real models' configs. They were handed over in the project's
shared folder and copied here unchanged, so a fresh clone tests itself.
"""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "golden"
IMAGES = DATA / "images"
CONFIGS = DATA / "configs"
